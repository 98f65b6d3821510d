//! The typed client a worker (or `hsat status`, or the benchmark) uses: async
//! methods over domain types, errors as [`ApiError`].
//!
//! A client is cheap to clone and clones share one HTTP/2 connection, on which
//! calls are multiplexed; [`CoordinatorClient::connect`] opens a new connection.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::ApiError;
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
}

fn endpoint(address: &str) -> Result<Endpoint, ApiError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .timeout(CALL_TIMEOUT)
        })
        .map_err(|err| {
            ApiError::InvalidArgument(format!(
                "coordinator address {address:?} is not a URI ({err}): give host:port"
            ))
        })
}

impl CoordinatorClient {
    /// Connects to `address` (`host:port` or `http://host:port`).
    pub async fn connect(address: &str) -> Result<Self, ApiError> {
        let channel = endpoint(address)?.connect().await.map_err(|err| {
            ApiError::Unavailable(format!(
                "cannot connect to the coordinator at {address} ({err}): check that it runs and the address"
            ))
        })?;
        Ok(Self::from_channel(channel))
    }

    /// A client that connects on first use (and reconnects after failures).
    pub fn connect_lazy(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(endpoint(address)?.connect_lazy()))
    }

    fn from_channel(channel: Channel) -> Self {
        Self {
            coordinator: coordinator_client::CoordinatorClient::new(channel.clone()),
            admin: AdminClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }

    /// Joins the job; `ApiError::Refused` names every config key, the dataset
    /// fingerprint or the version that differs from the coordinator's.
    pub async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        let response = self
            .coordinator
            .clone()
            .register(pb::RegisterRequest::from(registration))
            .await?;
        Registered::try_from(response.into_inner())
    }

    /// Renews the lease; `ApiError::UnknownWorker` means: register again.
    pub async fn heartbeat(&self, worker: WorkerId) -> Result<HeartbeatReply, ApiError> {
        let response = self
            .coordinator
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker.0,
            })
            .await?;
        HeartbeatReply::try_from(response.into_inner())
    }

    /// What to do next (the call may be held about a second before a `Wait`).
    pub async fn next_assignment(
        &self,
        request: AssignmentRequest,
    ) -> Result<Assignment, ApiError> {
        let response = self
            .coordinator
            .clone()
            .next_assignment(pb::AssignmentRequest::from(request))
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
            .publish_store(pb::PublishStoreRequest {
                worker_id: worker.0,
                generation,
                port: u32::from(port),
            })
            .await?;
        Ok(())
    }

    /// Reports that this rank applied the update of a step.
    pub async fn report_step(&self, report: StepReport) -> Result<(), ApiError> {
        self.coordinator
            .clone()
            .report_step(pb::StepReport::from(report))
            .await?;
        Ok(())
    }

    /// Leaves the job.
    pub async fn leave(&self, worker: WorkerId, reason: &str) -> Result<(), ApiError> {
        self.coordinator
            .clone()
            .leave(pb::LeaveRequest {
                worker_id: worker.0,
                reason: reason.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// The job's status (Admin service).
    pub async fn status(&self) -> Result<JobStatus, ApiError> {
        let response = self.admin.clone().get_status(pb::StatusRequest {}).await?;
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
