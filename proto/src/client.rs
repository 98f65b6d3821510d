//! The typed client a worker (or `hsat status`, or the benchmark) uses: async
//! methods over domain types, errors as [`ApiError`].
//!
//! A client is cheap to clone and clones share one HTTP/2 connection, on which
//! calls are multiplexed; [`CoordinatorClient::connect`] opens a new connection.
//!
//! Authentication ([`crate::auth`]): [`CoordinatorClient::with_token`] sets the job
//! token every call carries; `register` keeps the session token the coordinator
//! returns (shared by the clones), and every later call for that worker id carries
//! it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tonic::Request;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::ApiError;
use crate::auth::{AUTHORIZATION, SESSION_HEADER, Token};
use crate::domain::*;
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::coordinator_client;

/// Deadline of each call. `next_assignment` may be held about a second by the
/// coordinator, so this is well above that.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to the coordinator's `Coordinator`, `Admin` and health services.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    coordinator: coordinator_client::CoordinatorClient<Channel>,
    admin: AdminClient<Channel>,
    health: HealthClient<Channel>,
    /// `Bearer <job token>`, sent with every call but health checks.
    bearer: Option<AsciiMetadataValue>,
    /// Session tokens by worker id (from `register`, or set by hand).
    sessions: Arc<Mutex<HashMap<WorkerId, AsciiMetadataValue>>>,
}

fn endpoint(address: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, ApiError> {
    let uri = match (address.contains("://"), tls) {
        (true, _) => address.to_owned(),
        (false, None) => format!("http://{address}"),
        (false, Some(_)) => format!("https://{address}"),
    };
    let endpoint = Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .timeout(CALL_TIMEOUT)
        })
        .map_err(|err| {
            ApiError::InvalidArgument(format!(
                "coordinator address {address:?} is not a URI ({err}): give host:port"
            ))
        })?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|err| {
            ApiError::InvalidArgument(format!(
                "cannot use TLS for the coordinator at {address} ({err}): check security.tls_*"
            ))
        }),
        None => Ok(endpoint),
    }
}

impl CoordinatorClient {
    /// Connects to `address` (`host:port` or `http://host:port`).
    pub async fn connect(address: &str) -> Result<Self, ApiError> {
        Self::connect_tls(address, None).await
    }

    /// Connects to `address` over TLS when `tls` is set (`host:port` then means
    /// `https://host:port`).
    pub async fn connect_tls(
        address: &str,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, ApiError> {
        let channel = endpoint(address, tls)?.connect().await.map_err(|err| {
            ApiError::Unavailable(format!(
                "cannot connect to the coordinator at {address} ({err}): check that it runs and the address"
            ))
        })?;
        Ok(Self::from_channel(channel))
    }

    /// A client that connects on first use (and reconnects after failures).
    pub fn connect_lazy(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(endpoint(address, None)?.connect_lazy()))
    }

    fn from_channel(channel: Channel) -> Self {
        Self {
            coordinator: coordinator_client::CoordinatorClient::new(channel.clone()),
            admin: AdminClient::new(channel.clone()),
            health: HealthClient::new(channel),
            bearer: None,
            sessions: Arc::default(),
        }
    }

    /// Sends `token` as the job token with every call (`None`: none, for a
    /// coordinator started with `--insecure`).
    pub fn with_token(mut self, token: Option<&Token>) -> Self {
        self.bearer = token.map(Token::bearer);
        self
    }

    /// The session token the coordinator gave `worker` through this client.
    pub fn session(&self, worker: WorkerId) -> Option<Token> {
        self.sessions()
            .get(&worker)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| Token::parse(text, "session").ok())
    }

    /// Calls for `worker` carry `session` from now on (`None`: no session token).
    pub fn set_session(&self, worker: WorkerId, session: Option<&Token>) {
        let mut sessions = self.sessions();
        match session {
            Some(token) => sessions.insert(worker, token.header_value()),
            None => sessions.remove(&worker),
        };
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<WorkerId, AsciiMetadataValue>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `message` with the job token and, for a worker's call, its session token.
    fn request<T>(&self, message: T, worker: Option<WorkerId>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(bearer) = &self.bearer {
            request.metadata_mut().insert(AUTHORIZATION, bearer.clone());
        }
        if let Some(session) = worker.and_then(|w| self.sessions().get(&w).cloned()) {
            request.metadata_mut().insert(SESSION_HEADER, session);
        }
        request
    }

    /// Joins the job; `ApiError::Refused` names every config key, the dataset
    /// fingerprint or the version that differs from the coordinator's.
    pub async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        let response = self
            .coordinator
            .clone()
            .register(self.request(pb::RegisterRequest::from(registration), None))
            .await?
            .into_inner();
        let session = response.session_token.clone();
        let registered = Registered::try_from(response)?;
        if !session.is_empty() {
            let token =
                Token::parse(&session, "the coordinator's session token").map_err(|err| {
                    ApiError::InvalidArgument(format!("RegisterResponse.session_token: {err}"))
                })?;
            self.set_session(registered.worker_id, Some(&token));
        }
        Ok(registered)
    }

    /// Renews the lease; `ApiError::UnknownWorker` means: register again.
    pub async fn heartbeat(&self, worker: WorkerId) -> Result<HeartbeatReply, ApiError> {
        let response = self
            .coordinator
            .clone()
            .heartbeat(self.request(
                pb::HeartbeatRequest {
                    worker_id: worker.0,
                },
                Some(worker),
            ))
            .await?;
        HeartbeatReply::try_from(response.into_inner())
    }

    /// What to do next (the call may be held about a second before a `Wait`).
    pub async fn next_assignment(
        &self,
        request: AssignmentRequest,
    ) -> Result<Assignment, ApiError> {
        let worker = request.worker_id;
        let response = self
            .coordinator
            .clone()
            .next_assignment(self.request(pb::AssignmentRequest::from(request), Some(worker)))
            .await?;
        Assignment::try_from(response.into_inner())
    }

    /// Rank 0 of `generation` publishes the port of the TCPStore it hosts.
    pub async fn publish_store(
        &self,
        worker: WorkerId,
        generation: u64,
        port: u16,
    ) -> Result<(), ApiError> {
        self.coordinator
            .clone()
            .publish_store(self.request(
                pb::PublishStoreRequest {
                    worker_id: worker.0,
                    generation,
                    port: u32::from(port),
                },
                Some(worker),
            ))
            .await?;
        Ok(())
    }

    /// Reports that this rank applied the update of a step.
    pub async fn report_step(&self, report: StepReport) -> Result<(), ApiError> {
        let worker = report.worker_id;
        self.coordinator
            .clone()
            .report_step(self.request(pb::StepReport::from(report), Some(worker)))
            .await?;
        Ok(())
    }

    /// Leaves the job.
    pub async fn leave(&self, worker: WorkerId, reason: &str) -> Result<(), ApiError> {
        self.coordinator
            .clone()
            .leave(self.request(
                pb::LeaveRequest {
                    worker_id: worker.0,
                    reason: reason.to_owned(),
                },
                Some(worker),
            ))
            .await?;
        Ok(())
    }

    /// The job's status (Admin service).
    pub async fn status(&self) -> Result<JobStatus, ApiError> {
        let response = self
            .admin
            .clone()
            .get_status(self.request(pb::StatusRequest {}, None))
            .await?;
        JobStatus::try_from(response.into_inner())
    }

    /// True when the coordinator's health service says SERVING (false during its
    /// shutdown). Also a cheap round trip for latency baselines.
    pub async fn serving(&self) -> Result<bool, ApiError> {
        let response = self
            .health
            .clone()
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(response.into_inner().status() == ServingStatus::Serving)
    }
}
