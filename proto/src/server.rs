//! The server side: the coordinator implements [`CoordinatorHandler`] over domain
//! types, [`routes`] wraps it into the gRPC services `hsat.v1.Coordinator`,
//! `hsat.v1.Admin` and `grpc.health.v1.Health`. Requests are converted (and
//! rejected with `INVALID_ARGUMENT` and the reason) before the handler sees them.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::ApiError;
use crate::convert::StorePublication;
use crate::domain::*;
use crate::pb;

/// What the coordinator does for each RPC, in domain types.
pub trait CoordinatorHandler: Send + Sync + 'static {
    /// `Register`; `peer` is the socket address the request came from (for the log:
    /// the registration's own `advertise_host` is what the worker says about itself).
    fn register(
        &self,
        registration: Registration,
        peer: Option<std::net::SocketAddr>,
    ) -> impl Future<Output = Result<Registered, ApiError>> + Send;
    /// `Heartbeat`.
    fn heartbeat(
        &self,
        worker: WorkerId,
    ) -> impl Future<Output = Result<HeartbeatReply, ApiError>> + Send;
    /// `NextAssignment` (may wait briefly before answering `Wait`).
    fn next_assignment(
        &self,
        request: AssignmentRequest,
    ) -> impl Future<Output = Result<Assignment, ApiError>> + Send;
    /// `PublishStore`.
    fn publish_store(
        &self,
        publication: StorePublication,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// `ReportStep`.
    fn report_step(&self, report: StepReport) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// `Leave`.
    fn leave(
        &self,
        worker: WorkerId,
        reason: String,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// `Admin.GetStatus`.
    fn status(&self) -> impl Future<Output = Result<JobStatus, ApiError>> + Send;
}

/// Switches the health service between SERVING and NOT_SERVING (for the whole
/// server, `""`, and for `hsat.v1.Coordinator`).
#[derive(Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
}

impl HealthHandle {
    /// SERVING when `serving`, else NOT_SERVING (e.g. during shutdown).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", COORDINATOR_SERVICE] {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// The gRPC name of the coordinator service (for health checks).
pub const COORDINATOR_SERVICE: &str = "hsat.v1.Coordinator";

/// The coordinator, admin and health services over `handler`, to serve with
/// `tonic::transport::Server::builder().add_routes(..)`; the health status starts
/// SERVING.
pub async fn routes<H: CoordinatorHandler>(
    handler: Arc<H>,
) -> (tonic::service::Routes, HealthHandle) {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = HealthHandle { reporter };
    health.set_serving(true).await;
    let adapter = Adapter(handler);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(pb::coordinator_server::CoordinatorServer::new(
            adapter.clone(),
        ))
        .add_service(pb::admin_server::AdminServer::new(adapter));
    (routes, health)
}

struct Adapter<H>(Arc<H>);

impl<H> Clone for Adapter<H> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

fn reply<T, W: From<T>>(result: Result<T, ApiError>) -> Result<Response<W>, Status> {
    result
        .map(|value| Response::new(W::from(value)))
        .map_err(Status::from)
}

#[tonic::async_trait]
impl<H: CoordinatorHandler> pb::coordinator_server::Coordinator for Adapter<H> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = request.remote_addr();
        let registration = Registration::try_from(request.into_inner())?;
        reply(self.0.register(registration, peer).await)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = WorkerId::try_from(request.into_inner())?;
        reply(self.0.heartbeat(worker).await)
    }

    async fn next_assignment(
        &self,
        request: Request<pb::AssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let request = AssignmentRequest::try_from(request.into_inner())?;
        reply(self.0.next_assignment(request).await)
    }

    async fn publish_store(
        &self,
        request: Request<pb::PublishStoreRequest>,
    ) -> Result<Response<pb::PublishStoreResponse>, Status> {
        let publication = StorePublication::try_from(request.into_inner())?;
        self.0.publish_store(publication).await?;
        Ok(Response::new(pb::PublishStoreResponse {}))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let report = StepReport::try_from(request.into_inner())?;
        self.0.report_step(report).await?;
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let (worker, reason) = <(WorkerId, String)>::try_from(request.into_inner())?;
        self.0.leave(worker, reason).await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

#[tonic::async_trait]
impl<H: CoordinatorHandler> pb::admin_server::Admin for Adapter<H> {
    async fn get_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        reply(self.0.status().await)
    }
}
