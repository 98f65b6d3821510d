//! The server side: the coordinator implements [`CoordinatorHandler`] over domain
//! types, [`routes`] wraps it into the gRPC services `hsat.v1.Coordinator`,
//! `hsat.v1.Admin` and `grpc.health.v1.Health`, which the coordinator serves
//! with the [`Limits`]. Order of the checks of a call: the job token (an
//! interceptor, before the message is decoded; `grpc.health.v1` is exempt), the
//! message size, the conversion (rejected with `INVALID_ARGUMENT` naming the
//! field), the worker's session token (see [`crate::auth`]), then the handler.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::ApiError;
use crate::auth::{JobTokenCheck, ServerAuth};
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

/// Bounds on what one call may cost the server (config `[security]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message decoded or encoded, bytes; a larger request fails with
    /// `OUT_OF_RANGE` ("decoded message length too large") before it is decoded.
    pub max_message_bytes: usize,
    /// A call still running after this is cancelled (`CANCELLED`); well above the
    /// long poll of `NextAssignment`.
    pub request_timeout: Duration,
    /// Calls handled at once over all connections; more wait for a slot. Each
    /// worker holds up to one long poll and one heartbeat at a time.
    pub max_concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4096,
        }
    }
}

impl Limits {
    /// The limits of a `[security]` section.
    pub fn from_config(security: &hsat_core::config::SecurityConfig) -> Self {
        Self {
            max_message_bytes: security.max_message_bytes,
            request_timeout: security.request_timeout,
            max_concurrent_requests: security.max_concurrent_requests,
        }
    }
}

/// How the coordinator's gRPC server authenticates and limits calls.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The job token and sessions ([`ServerAuth::insecure`]: none).
    pub auth: Arc<ServerAuth>,
    /// Message size, timeout, concurrency.
    pub limits: Limits,
    /// Server TLS, mutual when it names a client CA ([`crate::tls::server_tls`]);
    /// `None`: plain HTTP/2.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

impl ServerOptions {
    /// Every call must carry `token`; default limits.
    pub fn secured(token: crate::auth::Token) -> Self {
        Self {
            auth: Arc::new(ServerAuth::new(token)),
            limits: Limits::default(),
            tls: None,
        }
    }

    /// No authentication (tests, `--insecure`); default limits.
    pub fn insecure() -> Self {
        Self {
            auth: Arc::new(ServerAuth::insecure()),
            limits: Limits::default(),
            tls: None,
        }
    }
}

/// The coordinator, admin and health services over `handler`, to serve with a
/// tonic server that applies the [`Limits`]; the health status starts SERVING. `auth` checks every
/// Coordinator and Admin call ([`ServerAuth::insecure`]: none).
pub async fn routes<H: CoordinatorHandler>(
    handler: Arc<H>,
    auth: Arc<ServerAuth>,
    limits: Limits,
) -> (tonic::service::Routes, HealthHandle) {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = HealthHandle { reporter };
    health.set_serving(true).await;
    let adapter = Adapter {
        handler,
        auth: Arc::clone(&auth),
    };
    let check = JobTokenCheck(auth);
    let bytes = limits.max_message_bytes;
    let coordinator = pb::coordinator_server::CoordinatorServer::new(adapter.clone())
        .max_decoding_message_size(bytes)
        .max_encoding_message_size(bytes);
    let admin = pb::admin_server::AdminServer::new(adapter)
        .max_decoding_message_size(bytes)
        .max_encoding_message_size(bytes);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(InterceptedService::new(coordinator, check.clone()))
        .add_service(InterceptedService::new(admin, check));
    (routes, health)
}

struct Adapter<H> {
    handler: Arc<H>,
    auth: Arc<ServerAuth>,
}

impl<H> Clone for Adapter<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
            auth: Arc::clone(&self.auth),
        }
    }
}

impl<H: CoordinatorHandler> Adapter<H> {
    /// The caller may act for `worker` (its session token; see [`crate::auth`]).
    fn authorize<T>(&self, worker: WorkerId, request: &Request<T>) -> Result<(), Status> {
        self.auth
            .check_session(worker, request.metadata(), request.remote_addr())
    }

    /// After a worker's call: a worker the coordinator no longer knows (lease
    /// expired, left) keeps no session.
    fn settle<T>(&self, worker: WorkerId, result: &Result<T, ApiError>) {
        if let Err(ApiError::UnknownWorker(_)) = result {
            self.auth.close_session(worker);
        }
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
        let registered = self.handler.register(registration, peer).await?;
        let session = self.auth.open_session(registered.worker_id)?;
        let mut response = pb::RegisterResponse::from(registered);
        if let Some(session) = session {
            response.session_token = session.expose().to_owned();
        }
        Ok(Response::new(response))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = WorkerId::try_from(*request.get_ref())?;
        self.authorize(worker, &request)?;
        let result = self.handler.heartbeat(worker).await;
        self.settle(worker, &result);
        reply(result)
    }

    async fn next_assignment(
        &self,
        request: Request<pb::AssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let assignment = AssignmentRequest::try_from(message)?;
        let worker = assignment.worker_id;
        self.authorize(worker, &Request::from_parts(metadata, extensions, ()))?;
        let result = self.handler.next_assignment(assignment).await;
        self.settle(worker, &result);
        reply(result)
    }

    async fn publish_store(
        &self,
        request: Request<pb::PublishStoreRequest>,
    ) -> Result<Response<pb::PublishStoreResponse>, Status> {
        let publication = StorePublication::try_from(*request.get_ref())?;
        let worker = publication.worker_id;
        self.authorize(worker, &request)?;
        let result = self.handler.publish_store(publication).await;
        self.settle(worker, &result);
        result?;
        Ok(Response::new(pb::PublishStoreResponse {}))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let report = StepReport::try_from(message)?;
        let worker = report.worker_id;
        self.authorize(worker, &Request::from_parts(metadata, extensions, ()))?;
        let result = self.handler.report_step(report).await;
        self.settle(worker, &result);
        result?;
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let (worker, reason) = <(WorkerId, String)>::try_from(request.get_ref().clone())?;
        self.authorize(worker, &request)?;
        let result = self.handler.leave(worker, reason).await;
        // Gone either way: its session ends with it.
        self.auth.close_session(worker);
        result?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

#[tonic::async_trait]
impl<H: CoordinatorHandler> pb::admin_server::Admin for Adapter<H> {
    async fn get_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        reply(self.handler.status().await)
    }
}
