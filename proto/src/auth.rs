//! Authentication of the control plane.
//!
//! Two secrets, both random and compared in constant time:
//!
//! - the **job token**: every call of `hsat.v1.Coordinator` and `hsat.v1.Admin`
//!   carries it as `authorization: Bearer <token>` (standard gRPC metadata, so any
//!   gRPC client can call hsat). Without it, or with another, the call fails with
//!   `UNAUTHENTICATED` before its message is even decoded. `grpc.health.v1` stays
//!   open for probes: it reveals SERVING or not, nothing else.
//! - a **session token** per worker: `Register` returns one bound to the worker id
//!   it assigns; the worker's later calls (heartbeat, assignment, publish, report,
//!   leave) carry it as `x-hsat-session: <token>`. A call for a worker without a
//!   session token is `UNAUTHENTICATED`; with another worker's (or a made-up one)
//!   it is `PERMISSION_DENIED`: the caller holds the job token but may not act for
//!   that worker. Either way the worker's state is not touched.
//!
//! Refusals are logged with the peer address (never a token), at most one line per
//! peer address per [`FAILURE_LOG_EVERY`] with the count suppressed since, so a
//! client retrying with a bad token cannot flood the log.
//!
//! Where a process finds the job token: [`resolve_token`] (`--token-file`, then
//! `HSAT_TOKEN`, `HSAT_TOKEN_FILE`, then the config key `security.token_file`).

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::ApiError;
use crate::domain::WorkerId;

/// Metadata key of the job token (`Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
/// Metadata key of a worker's session token.
pub const SESSION_HEADER: &str = "x-hsat-session";
/// Environment variable holding the job token itself.
pub const TOKEN_ENV: &str = "HSAT_TOKEN";
/// Environment variable holding the path of the job token file.
pub const TOKEN_FILE_ENV: &str = "HSAT_TOKEN_FILE";
/// At most one log line per peer address and this period for refused calls.
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Shortest token accepted: 16 characters (a generated one has 64 hex digits).
const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (it travels in every call's metadata).
const MAX_TOKEN_LEN: usize = 1024;
/// Peer addresses remembered by the failure log before old ones are dropped.
const MAX_LOGGED_PEERS: usize = 4096;

/// Why a token could not be found, read, made or written.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file cannot be read.
    #[error("cannot read the job token file {} (from {origin}); check the path and its permissions", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Which setting named it.
        origin: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The token is not usable.
    #[error(
        "the job token from {origin} is unusable: {why}; use at least {MIN_TOKEN_LEN} printable \
         ASCII characters without spaces (`hsat run` generates one)"
    )]
    Malformed {
        /// Where it came from.
        origin: String,
        /// What is wrong (never the token itself).
        why: String,
    },
    /// The operating system's random source failed.
    #[error("cannot draw a random token from the operating system: {0}")]
    Random(String),
    /// The token file cannot be written.
    #[error("cannot write the job token file {}; check that its folder is writable", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// A secret: a job token or a session token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A new random token: 32 bytes from the operating system, as 64 hex digits.
    pub fn generate() -> Result<Self, AuthError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|err| AuthError::Random(err.to_string()))?;
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(text.into()))
    }

    /// A token from text (a file's content: surrounding whitespace is dropped);
    /// `origin` names where it came from, for the error.
    pub fn parse(text: &str, origin: &str) -> Result<Self, AuthError> {
        let token = text.trim();
        let malformed = |why: &str| AuthError::Malformed {
            origin: origin.to_owned(),
            why: why.to_owned(),
        };
        if token.is_empty() {
            return Err(malformed("it is empty"));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(malformed(&format!(
                "it has {} characters, fewer than {MIN_TOKEN_LEN}",
                token.len()
            )));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(&format!(
                "it has {} characters, more than {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        // Printable ASCII without spaces: a valid gRPC metadata value as it is.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(
                "it holds spaces, control or non-ASCII characters",
            ));
        }
        Ok(Self(token.into()))
    }

    /// The secret itself, to send or to write to a file; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        // Lengths are not secret (a generated token's length is documented).
        self.0.as_bytes().ct_eq(presented).into()
    }

    /// As a metadata value marked sensitive (HTTP/2 never indexes it).
    fn metadata_value(&self, prefix: &str) -> AsciiMetadataValue {
        let mut value = AsciiMetadataValue::try_from(format!("{prefix}{}", self.expose()))
            .unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"));
        value.set_sensitive(true);
        value
    }

    /// `Bearer <token>`, for the `authorization` metadata.
    pub fn bearer(&self) -> AsciiMetadataValue {
        self.metadata_value("Bearer ")
    }

    /// The token as a metadata value (the session header).
    pub fn header_value(&self) -> AsciiMetadataValue {
        self.metadata_value("")
    }
}

/// Reads a token file; `origin` names the setting that pointed at it.
pub fn read_token_file(path: &Path, origin: &str) -> Result<Token, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        origin: origin.to_owned(),
        source,
    })?;
    warn_if_readable_by_others(path);
    Token::parse(&text, &format!("{} ({origin})", path.display()))
}

/// Warns when users other than the intended ones can read the token: always for
/// a world-readable file; for a group-readable one only when the process owns it.
/// A file owned by someone else (Kubernetes mounts a Secret owned by root, mode
/// 0440, group `fsGroup`) is readable to a non-root process only through its group,
/// so the group bit is the deployment's intent, not a mistake.
#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    // `/proc/self` belongs to the process's uid; without procfs assume ownership,
    // which keeps the stricter warning.
    let owned_by_us = std::fs::metadata("/proc/self").map_or(true, |me| me.uid() == meta.uid());
    if token_file_exposed(mode, owned_by_us) {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "the job token file is readable by other users: `chmod 600` it"
        );
    }
}

/// Whether a token file's permission bits `mode` let unintended users read it.
fn token_file_exposed(mode: u32, owned_by_us: bool) -> bool {
    mode & 0o007 != 0 || (owned_by_us && mode & 0o070 != 0)
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Writes `token` to `path` readable by its owner only (mode 0600), creating the
/// folder; an existing file is replaced.
pub fn write_token_file(path: &Path, token: &Token) -> Result<(), AuthError> {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            let mut file = options.open(path)?;
            // An existing file keeps its mode on open: set it.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(token.expose().as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        }
        #[cfg(not(unix))]
        {
            let mut file = options.open(path)?;
            file.write_all(token.expose().as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        }
    };
    write().map_err(|source| AuthError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Finds the job token, first found wins: the `--token-file` flag, the
/// `HSAT_TOKEN` environment variable (the token itself), `HSAT_TOKEN_FILE` (a
/// path), the config key `security.token_file` (empty = unset). `env` reads the
/// environment (tests pass a map). `Ok(None)`: no token configured anywhere.
pub fn resolve_token(
    flag: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    config_file: Option<&Path>,
) -> Result<Option<Token>, AuthError> {
    if let Some(path) = flag {
        return read_token_file(path, "--token-file").map(Some);
    }
    if let Some(text) = env(TOKEN_ENV).filter(|t| !t.trim().is_empty()) {
        return Token::parse(&text, TOKEN_ENV).map(Some);
    }
    if let Some(path) = env(TOKEN_FILE_ENV).filter(|p| !p.trim().is_empty()) {
        return read_token_file(Path::new(&path), TOKEN_FILE_ENV).map(Some);
    }
    match config_file.filter(|p| !p.as_os_str().is_empty()) {
        Some(path) => read_token_file(path, "security.token_file").map(Some),
        None => Ok(None),
    }
}

/// Why a call was refused, for logs and the `hsat_auth_failures_total{reason}`
/// metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No `authorization` metadata.
    MissingToken,
    /// A token that is not the job's (or not `Bearer <token>`).
    WrongToken,
    /// A worker's call without its session token, or with another one.
    WrongSession,
}

impl AuthFailure {
    /// The metric label: `missing_token`, `wrong_token`, `wrong_session`.
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::WrongToken => "wrong_token",
            Self::WrongSession => "wrong_session",
        }
    }
}

/// Called once per refused call (the metrics hook).
pub type FailureHook = Arc<dyn Fn(AuthFailure) + Send + Sync>;

/// The server's authentication: the job token (`None`: insecure, nothing is
/// checked), the sessions handed out, the rate-limited failure log.
pub struct ServerAuth {
    token: Option<Token>,
    sessions: Mutex<HashMap<WorkerId, Token>>,
    log: FailureLog,
    hook: Option<FailureHook>,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth")
            .field("enabled", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerAuth {
    /// Every call must carry `token`; workers get session tokens.
    pub fn new(token: Token) -> Self {
        Self::with(Some(token))
    }

    /// No authentication at all (`--insecure`): anyone reaching the port can
    /// register, act for any worker and read the status.
    pub fn insecure() -> Self {
        Self::with(None)
    }

    fn with(token: Option<Token>) -> Self {
        Self {
            token,
            sessions: Mutex::new(HashMap::new()),
            log: FailureLog::new(FAILURE_LOG_EVERY),
            hook: None,
        }
    }

    /// Calls `hook` for every refused call (e.g. to count it in a metric).
    pub fn with_failure_hook(mut self, hook: FailureHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Whether calls are authenticated.
    pub fn is_enabled(&self) -> bool {
        self.token.is_some()
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<WorkerId, Token>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refuse(&self, failure: AuthFailure, peer: Option<SocketAddr>, status: Status) -> Status {
        self.log.record(peer, failure);
        if let Some(hook) = &self.hook {
            hook(failure);
        }
        status
    }

    /// The job-token check of every Coordinator and Admin call (run by the
    /// interceptor before the message is decoded).
    pub fn check_job_token(
        &self,
        metadata: &MetadataMap,
        peer: Option<SocketAddr>,
    ) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Some(value) = metadata.get(AUTHORIZATION) else {
            return Err(self.refuse(
                AuthFailure::MissingToken,
                peer,
                Status::unauthenticated(
                    "missing job token: send `authorization: Bearer <token>` with the job's token \
                     (--token-file, HSAT_TOKEN_FILE, HSAT_TOKEN or security.token_file)",
                ),
            ));
        };
        let presented = value.as_bytes();
        let credentials = presented
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &presented[7..]);
        if credentials.is_some_and(|c| token.matches(c)) {
            return Ok(());
        }
        Err(self.refuse(
            AuthFailure::WrongToken,
            peer,
            Status::unauthenticated(
                "wrong job token: the bearer token is not this job's; use the job's token file",
            ),
        ))
    }

    /// A new session token for `worker` (just registered); `None` when insecure.
    pub fn open_session(&self, worker: WorkerId) -> Result<Option<Token>, ApiError> {
        if self.token.is_none() {
            return Ok(None);
        }
        let session = Token::generate().map_err(|err| ApiError::Internal(err.to_string()))?;
        self.sessions().insert(worker, session.clone());
        Ok(Some(session))
    }

    /// Forgets `worker`'s session (it left, or the coordinator forgot the worker).
    pub fn close_session(&self, worker: WorkerId) {
        self.sessions().remove(&worker);
    }

    /// Whether the caller may act for `worker`: it presented `worker`'s session
    /// token. An id without a session is unknown (`UnknownWorker`: register again;
    /// what a worker hears after the coordinator restarted).
    pub fn check_session(
        &self,
        worker: WorkerId,
        metadata: &MetadataMap,
        peer: Option<SocketAddr>,
    ) -> Result<(), Status> {
        if self.token.is_none() {
            return Ok(());
        }
        let matches = {
            let sessions = self.sessions();
            let Some(session) = sessions.get(&worker) else {
                return Err(ApiError::UnknownWorker(format!(
                    "worker {worker} is unknown or its lease expired: register again"
                ))
                .into());
            };
            metadata
                .get(SESSION_HEADER)
                .map(|value| session.matches(value.as_bytes()))
        };
        match matches {
            Some(true) => Ok(()),
            None => Err(self.refuse(
                AuthFailure::WrongSession,
                peer,
                ApiError::Unauthenticated(format!(
                    "missing session token for worker {worker}: send `{SESSION_HEADER}` with the \
                     token its Register returned"
                ))
                .into(),
            )),
            Some(false) => Err(self.refuse(
                AuthFailure::WrongSession,
                peer,
                ApiError::PermissionDenied(format!(
                    "the session token is not worker {worker}'s: a worker acts only for itself"
                ))
                .into(),
            )),
        }
    }
}

/// The interceptor checking the job token of every Coordinator and Admin call.
#[derive(Clone)]
pub(crate) struct JobTokenCheck(pub(crate) Arc<ServerAuth>);

impl tonic::service::Interceptor for JobTokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.0
            .check_job_token(request.metadata(), request.remote_addr())?;
        Ok(request)
    }
}

/// Refused calls per peer address: one log line per `every`, with the count of
/// the refusals not logged since.
struct FailureLog {
    every: Duration,
    peers: Mutex<HashMap<Option<IpAddr>, PeerLog>>,
}

struct PeerLog {
    last_logged: Instant,
    suppressed: u64,
}

impl FailureLog {
    fn new(every: Duration) -> Self {
        Self {
            every,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Records a refusal; returns whether it was logged.
    fn record(&self, peer: Option<SocketAddr>, failure: AuthFailure) -> bool {
        let now = Instant::now();
        let ip = peer.map(|addr| addr.ip());
        let suppressed = {
            let mut peers = self
                .peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if peers.len() >= MAX_LOGGED_PEERS && !peers.contains_key(&ip) {
                // Many addresses (a scan): forget the quiet ones.
                let every = self.every;
                peers.retain(|_, log| now.duration_since(log.last_logged) < every);
            }
            match peers.get_mut(&ip) {
                Some(log) if now.duration_since(log.last_logged) < self.every => {
                    log.suppressed += 1;
                    return false;
                }
                Some(log) => {
                    let suppressed = log.suppressed;
                    log.last_logged = now;
                    log.suppressed = 0;
                    suppressed
                }
                None => {
                    peers.insert(
                        ip,
                        PeerLog {
                            last_logged: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        let peer = peer.map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
        tracing::warn!(
            %peer,
            reason = %failure.label(),
            suppressed_since_last_line = suppressed,
            "refused a control-plane call (authentication)"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Token {
        Token::parse(text, "test").unwrap()
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (key, value) in pairs {
            map.insert(*key, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_token_file_is_exposed_when_the_world_or_its_owners_group_can_read_it() {
        // A user's own file: any group or world bit is a mistake.
        assert!(!token_file_exposed(0o600, true));
        assert!(!token_file_exposed(0o400, true));
        assert!(token_file_exposed(0o640, true));
        assert!(token_file_exposed(0o604, true));
        // A Kubernetes Secret (root-owned, group fsGroup): group read is how a
        // non-root pod reads it; world read still is not.
        assert!(!token_file_exposed(0o440, false));
        assert!(token_file_exposed(0o444, false));
    }

    #[test]
    fn generated_tokens_are_long_random_and_parse_back() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert_eq!(Token::parse(&format!("{}\n", a.expose()), "x").unwrap(), a);
    }

    #[test]
    fn malformed_tokens_are_refused_naming_the_source_not_the_token() {
        for (text, why) in [
            ("", "empty"),
            ("short", "fewer than 16"),
            ("has a space inside it", "spaces"),
        ] {
            let err = Token::parse(text, "HSAT_TOKEN").unwrap_err().to_string();
            assert!(
                err.contains("HSAT_TOKEN") && err.contains(why),
                "{text:?}: {err}"
            );
            assert!(text.is_empty() || !err.contains(text), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = token("0123456789abcdef0123");
        assert!(!format!("{t:?}").contains("0123456789"));
    }

    #[test]
    fn the_job_token_must_be_a_bearer_of_the_right_value() {
        let auth = ServerAuth::new(token("0123456789abcdef0123"));
        assert!(
            auth.check_job_token(
                &metadata(&[(AUTHORIZATION, "Bearer 0123456789abcdef0123")]),
                None
            )
            .is_ok()
        );
        let missing = auth.check_job_token(&metadata(&[]), None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("missing job token"), "{missing}");
        for wrong in [
            "Bearer 0123456789abcdef0124",
            "Bearer 0123456789abcdef012",
            "0123456789abcdef0123",
            "Basic 0123456789abcdef0123",
        ] {
            let err = auth
                .check_job_token(&metadata(&[(AUTHORIZATION, wrong)]), None)
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong}");
            assert!(err.message().contains("wrong job token"), "{err}");
        }
    }

    #[test]
    fn insecure_checks_nothing() {
        let auth = ServerAuth::insecure();
        assert!(auth.check_job_token(&metadata(&[]), None).is_ok());
        assert!(auth.open_session(WorkerId(1)).unwrap().is_none());
        assert!(
            auth.check_session(WorkerId(7), &metadata(&[]), None)
                .is_ok()
        );
    }

    #[test]
    fn a_worker_acts_only_with_its_own_session() {
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&failures);
        let auth = ServerAuth::new(token("0123456789abcdef0123"))
            .with_failure_hook(Arc::new(move |f| seen.lock().unwrap().push(f)));
        let one = auth.open_session(WorkerId(1)).unwrap().unwrap();
        let two = auth.open_session(WorkerId(2)).unwrap().unwrap();
        let with = |t: &Token| metadata(&[(SESSION_HEADER, t.expose())]);
        assert!(auth.check_session(WorkerId(1), &with(&one), None).is_ok());
        let forged = auth
            .check_session(WorkerId(2), &with(&one), None)
            .unwrap_err();
        assert_eq!(forged.code(), tonic::Code::PermissionDenied);
        assert!(forged.message().contains("not worker w2's"), "{forged}");
        let missing = auth
            .check_session(WorkerId(2), &metadata(&[]), None)
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(
            missing.message().contains("missing session token"),
            "{missing}"
        );
        // An id the coordinator does not know (e.g. from before a restart): register again.
        let unknown = auth
            .check_session(WorkerId(9), &with(&two), None)
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        auth.close_session(WorkerId(2));
        let closed = auth
            .check_session(WorkerId(2), &with(&two), None)
            .unwrap_err();
        assert_eq!(closed.code(), tonic::Code::NotFound);
        assert_eq!(
            *failures.lock().unwrap(),
            vec![AuthFailure::WrongSession, AuthFailure::WrongSession]
        );
    }

    #[test]
    fn refusals_are_logged_once_per_peer_and_period() {
        let log = FailureLog::new(Duration::from_secs(3600));
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let a_other_port: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        assert!(log.record(Some(a), AuthFailure::WrongToken));
        assert!(!log.record(Some(a), AuthFailure::WrongToken));
        assert!(!log.record(Some(a_other_port), AuthFailure::MissingToken));
        assert!(log.record(Some(b), AuthFailure::WrongToken));
        let peers = log.peers.lock().unwrap();
        assert_eq!(peers[&Some(a.ip())].suppressed, 2);
    }

    #[test]
    fn tokens_resolve_flag_then_env_then_config() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let flag = write("flag", "flag-token-0123456789\n");
        let file_env = write("env", "file-env-token-0123456789");
        let config = write("config", "config-token-0123456789");
        let env = |map: Vec<(&'static str, String)>| {
            move |key: &str| map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
        };
        let all = vec![
            (TOKEN_ENV, "env-token-0123456789".to_owned()),
            (TOKEN_FILE_ENV, file_env.display().to_string()),
        ];
        let got = |flag: Option<&Path>, env_map: Vec<(&'static str, String)>| {
            resolve_token(flag, env(env_map), Some(&config))
                .unwrap()
                .unwrap()
                .expose()
                .to_owned()
        };
        assert_eq!(got(Some(&flag), all.clone()), "flag-token-0123456789");
        assert_eq!(got(None, all.clone()), "env-token-0123456789");
        assert_eq!(got(None, all[1..].to_vec()), "file-env-token-0123456789");
        assert_eq!(got(None, vec![]), "config-token-0123456789");
        assert!(resolve_token(None, env(vec![]), None).unwrap().is_none());
        let missing = resolve_token(Some(&dir.path().join("nope")), env(vec![]), None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nope") && missing.contains("--token-file"),
            "{missing}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn token_files_are_written_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator/token");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let t = Token::generate().unwrap();
        write_token_file(&path, &t).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_token_file(&path, "test").unwrap(), t);
    }
}
