//! The fault relay: a TCP relay the harness puts between two components (a drone and its
//! controller, the proxy and its controller, a controller and PostgreSQL). It passes bytes both ways
//! until told to misbehave: drop (close every open connection), delay (hold every chunk), black-hole
//! (keep connections open, forward nothing), half-open (forward one direction only), reset (reset
//! every open connection and refuse new ones with a reset). [`RelayMode::Pass`] heals it.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the relay treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RelayMode {
    Pass,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
    /// Connections stay open and new ones are accepted, but nothing is forwarded.
    BlackHole,
    /// Only the client-to-server direction is forwarded (answers are lost).
    HalfOpen,
    /// Open connections are reset; new ones are accepted and reset at once.
    Reset,
}

/// A running relay; dropping it does not stop it, [`Relay::shutdown`] does.
pub struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<(RelayMode, u64)>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Relay {
    /// Listens on a free loopback port and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        Relay::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listens on `listen` and relays to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel((RelayMode::Pass, 0));
        let relay = Relay {
            addr,
            mode,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let accept = run_accept(
            listener,
            target,
            relay.mode.subscribe(),
            relay.cancel.clone(),
            relay.tasks.clone(),
        );
        relay.tasks.spawn(accept);
        Ok(relay)
    }

    /// Listens on a free loopback port in front of the PostgreSQL server `url` names
    /// (`postgres://user:password@host:port/database`, port 5432 if none); returns the relay and
    /// `url` rewritten to reach the server through it.
    pub async fn start_for_postgres_url(url: &url::Url) -> std::io::Result<(Relay, url::Url)> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let host = url
            .host_str()
            .ok_or_else(|| invalid("the URL names no host"))?;
        let server = tokio::net::lookup_host((host, url.port().unwrap_or(5432)))
            .await?
            .next()
            .ok_or_else(|| invalid("the URL's host has no address"))?;
        let relay = Relay::start(server).await?;
        let mut through = url.clone();
        through
            .set_host(Some(&relay.addr().ip().to_string()))
            .map_err(|_| invalid("the URL's host cannot be replaced"))?;
        through
            .set_port(Some(relay.addr().port()))
            .map_err(|()| invalid("the URL's port cannot be replaced"))?;
        Ok((relay, through))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches mode; switching to `Reset` ends every open connection.
    pub fn set(&self, mode: RelayMode) {
        self.mode.send_modify(|(m, epoch)| {
            *m = mode;
            *epoch += 1;
        });
    }

    /// Closes every open connection (a "drop" fault): they end, new ones pass.
    pub fn drop_connections(&self) {
        self.set(RelayMode::Reset);
        self.set(RelayMode::Pass);
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn run_accept(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<(RelayMode, u64)>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if mode.borrow().0 == RelayMode::Reset {
            reset(client);
            continue;
        }
        tasks.spawn(relay_connection(
            client,
            target,
            mode.clone(),
            cancel.clone(),
        ));
    }
}

/// Closes `stream` with a reset (linger 0).
fn reset(stream: TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// Makes closing `stream` send a reset. Deprecated in tokio because a non-zero linger blocks the
/// thread on drop; a zero linger never blocks (the kernel discards and resets at once).
#[allow(deprecated)]
fn reset_on_close(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn relay_connection(
    client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<(RelayMode, u64)>,
    cancel: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        reset(client);
        return;
    };
    // Linger 0: when a reset fault ends the connection, both sides see a reset, not a clean close.
    for stream in [&client, &server] {
        let _ = stream.set_nodelay(true);
        reset_on_close(stream);
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, mode.clone(), true);
    let down = pump(server_read, client_write, mode.clone(), false);
    // A connection ends when either direction ends, on a reset, or when the harness stops.
    let reset_seen = async {
        loop {
            if mode.changed().await.is_err() {
                return;
            }
            if mode.borrow().0 == RelayMode::Reset {
                return;
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = reset_seen => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies `from` to `to` under the current mode. `upstream` is the client-to-server direction.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<(RelayMode, u64)>,
    upstream: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let current = mode.borrow().0;
        match current {
            RelayMode::Pass => {}
            RelayMode::Delay(d) => tokio::time::sleep(d).await,
            RelayMode::BlackHole => continue,
            RelayMode::HalfOpen if !upstream => continue,
            RelayMode::HalfOpen => {}
            RelayMode::Reset => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
