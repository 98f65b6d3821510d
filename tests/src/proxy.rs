//! A TCP fault proxy for outage scenarios: it forwards `127.0.0.1:<port>` to a
//! target (the coordinator) and can [`FaultProxy::cut`] (close every forwarded
//! connection and stop listening, so new connections are refused) and
//! [`FaultProxy::restore`] (listen again on the same port). Threads and std only.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the accept loop looks for new connections and for cut/restore.
const POLL: Duration = Duration::from_millis(10);

struct Shared {
    target: SocketAddr,
    /// Cut: no listener, no connections.
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every forwarded connection, to close them on a cut.
    connections: Mutex<Vec<TcpStream>>,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicUsize,
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on an OS-chosen port of 127.0.0.1 and forwards to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            accepted: std::sync::atomic::AtomicUsize::new(0),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept_loop(listener, address, &shared))
        };
        Ok(Self {
            address,
            shared,
            accept: Some(accept),
        })
    }

    /// The address clients connect to (`127.0.0.1:<port>`).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connections accepted so far (a client that reconnected after a cut adds one).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Closes every forwarded connection and stops listening: new connections are
    /// refused until [`Self::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        close_all(&self.shared);
        // The accept loop drops its listener within one poll.
        std::thread::sleep(POLL * 3);
    }

    /// Listens again on the same port.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        std::thread::sleep(POLL * 3);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        close_all(&self.shared);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn close_all(shared: &Shared) {
    let connections = std::mem::take(
        &mut *shared
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    for stream in connections {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: TcpListener, address: SocketAddr, shared: &Shared) {
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::SeqCst) {
        let cut = shared.cut.load(Ordering::SeqCst);
        if cut {
            // Closing the listening socket is what makes connects fail with
            // "connection refused", as with a coordinator that is down.
            listener = None;
        } else if listener.is_none() {
            // std sets SO_REUSEADDR, so the port can be bound again at once.
            listener = TcpListener::bind(address).ok();
        }
        let Some(active) = &listener else {
            std::thread::sleep(POLL);
            continue;
        };
        let _ = active.set_nonblocking(true);
        match active.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = forward(client, shared);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Connects to the target and copies bytes both ways on two threads.
fn forward(client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = match TcpStream::connect(shared.target) {
        Ok(server) => server,
        Err(err) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(err);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut connections = shared
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        connections.push(client.try_clone()?);
        connections.push(server.try_clone()?);
    }
    for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            // One side ended: end the other, as a TCP middlebox would.
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}
