//! The connection workers: `workers` threads, each with a current-thread tokio runtime and its own
//! socket on every listening address (`SO_REUSEPORT`: the kernel spreads new connections over the
//! sockets). A client connection, its requests and the backend connection it keeps all run on the
//! thread that accepted it, so forwarding a request wakes no other thread (on a multi-threaded
//! runtime each request handed work between two tasks that often ran on different threads, and
//! idle workers were parked and unparked through futexes) — the way nginx runs one event loop per
//! worker process.
//!
//! Everything else (controller session, keepalives, lease expiry, certificates, metrics listener)
//! runs on the caller's runtime; what the workers share with it is in `ProxyState` (route cache,
//! connection tracker, limits, TLS state, shutdown tokens, the task tracker). Tasks a connection
//! starts (its kept backend connection, a WebSocket tunnel, HTTP/2 streams) run on its worker.
//!
//! Must not: end a worker's runtime while a task on it is still tracked — a worker keeps running
//! after its accept loops have drained until the hard stop, and then until every tracked task ended.

use crate::server::{run_accept_loop, ListenerKind};
use crate::ProxyState;
use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Backlog of the listening sockets the workers add (what the standard library uses too).
const LISTEN_BACKLOG: i32 = 1024;

/// The number of workers for a configured count: `0` means one per available core.
pub(crate) fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One socket per worker on `listener`'s address: `listener` itself first, then `count - 1` more
/// bound with `SO_REUSEPORT` (which `listener` gets too: Linux lets a bound, listening socket join a
/// port group it creates when the next socket binds). Where that is not possible, the workers
/// share `listener` (each polls a duplicate of it), which works but does not spread connections.
fn listener_copies(
    listener: TcpListener,
    count: usize,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let first = listener
        .into_std()
        .context("cannot take over the proxy's listener")?;
    let mut copies = Vec::with_capacity(count);
    for _ in 1..count {
        match reuse_port_copy(&first) {
            Ok(copy) => copies.push(copy),
            Err(error) => {
                tracing::warn!(%error, "Cannot open another listening socket with SO_REUSEPORT; the workers share one socket");
                copies.clear();
                for _ in 1..count {
                    copies.push(first.try_clone().context("cannot duplicate the listener")?);
                }
                break;
            }
        }
    }
    copies.insert(0, first);
    Ok(copies)
}

fn reuse_port_copy(first: &std::net::TcpListener) -> std::io::Result<std::net::TcpListener> {
    let addr = first.local_addr()?;
    let existing = socket2::SockRef::from(first);
    existing.set_reuse_port(true)?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(existing.only_v6()?)?;
    }
    // As tokio's `TcpListener::bind` does on Unix: a restart can bind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Starts `count` workers, each serving one socket of every listener in `served`.
pub(crate) fn start_workers(
    state: &Arc<ProxyState>,
    served: Vec<(TcpListener, ListenerKind)>,
    count: usize,
    drain: &CancellationToken,
) -> anyhow::Result<Vec<WorkerHandle>> {
    let mut per_worker: Vec<WorkerListeners> = (0..count).map(|_| Vec::new()).collect();
    for (listener, kind) in served {
        let copies = listener_copies(listener, count)?;
        for (worker, copy) in per_worker.iter_mut().zip(copies) {
            worker.push((copy, kind.clone()));
        }
    }
    per_worker
        .into_iter()
        .enumerate()
        .map(|(index, listeners)| spawn_worker(index, state.clone(), listeners, drain.clone()))
        .collect()
}

/// A running worker thread, as shutdown sees it.
pub(crate) struct WorkerHandle {
    /// Completes once the worker's accept loops have stopped and drained their connections (or the
    /// grace period ended).
    drained: oneshot::Receiver<()>,
    /// Completes once the worker's runtime has ended (every tracked task ended).
    exited: oneshot::Receiver<()>,
}

impl WorkerHandle {
    pub(crate) async fn drained(&mut self) {
        let _ = (&mut self.drained).await;
    }

    pub(crate) async fn exited(self) {
        let _ = self.exited.await;
    }
}

/// What one worker serves: one socket of each listener, with its kind.
type WorkerListeners = Vec<(std::net::TcpListener, ListenerKind)>;

/// Starts worker `index` on its own thread serving `listeners` until `drain` fires; it then stays
/// up for the tasks on it until the hard stop.
fn spawn_worker(
    index: usize,
    state: Arc<ProxyState>,
    listeners: WorkerListeners,
    drain: CancellationToken,
) -> anyhow::Result<WorkerHandle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a proxy worker's runtime")?;
    let listeners = {
        // Registered with the worker's own IO driver.
        let _entered = runtime.enter();
        listeners
            .into_iter()
            .map(|(listener, kind)| Ok((TcpListener::from_std(listener)?, kind)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot register a listener with a proxy worker")?
    };
    let (drained_tx, drained) = oneshot::channel();
    let (exited_tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("hangar-proxy-{index}"))
        .spawn(move || {
            runtime.block_on(run_worker(index, state, listeners, drain, drained_tx));
            // Dropping the runtime drops whatever is left on it; nothing tracked is left by now.
            drop(runtime);
            let _ = exited_tx.send(());
        })
        .context("cannot start a proxy worker thread")?;
    Ok(WorkerHandle { drained, exited })
}

async fn run_worker(
    index: usize,
    state: Arc<ProxyState>,
    listeners: Vec<(TcpListener, ListenerKind)>,
    drain: CancellationToken,
    drained: oneshot::Sender<()>,
) {
    let accept_loops = listeners.into_iter().map(|(listener, kind)| {
        run_accept_loop(listener, kind, state.clone(), index, drain.clone())
    });
    futures_util::future::join_all(accept_loops).await;
    let _ = drained.send(());
    // Tunnels and the last exchanges may still run here: stay up until the hard stop, then until
    // every tracked task (on any runtime) has ended, so none of this worker's is cut off.
    state.cancel.cancelled().await;
    state.tasks.close();
    state.tasks.wait().await;
}
