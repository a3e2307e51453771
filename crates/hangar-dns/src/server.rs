//! The UDP and TCP loops: receive DNS messages, answer each one in its own task through the
//! [`Responder`], and stop when cancelled. Both transports bound their concurrency so a flood cannot
//! exhaust memory: over the limit, UDP datagrams are dropped (resolvers retry) and TCP connections are
//! closed at once.

use crate::responder::{Responder, Transport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most UDP queries answered at once (each may wait up to the lookup timeout).
pub(crate) const MAX_UDP_IN_FLIGHT: usize = 1024;
/// Most TCP connections served at once.
pub(crate) const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection is closed when a message does not arrive (or cannot be written) within this time.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer: the largest possible UDP payload, so no datagram is cut.
const UDP_BUFFER: usize = 65_535;

/// Answers datagrams on `socket` until `cancel` fires.
pub(crate) async fn run_udp(
    socket: Arc<UdpSocket>,
    responder: Arc<Responder>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let (len, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    // E.g. ICMP port-unreachable from an earlier answer; the socket stays usable.
                    tracing::debug!(%error, "UDP receive failed");
                    continue;
                }
            },
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "Too many DNS queries in flight; dropping one");
            continue;
        };
        let packet = buf[..len].to_vec();
        let (socket, responder, cancel) = (socket.clone(), responder.clone(), cancel.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let response = tokio::select! {
                _ = cancel.cancelled() => return,
                response = responder.respond(&packet, Transport::Udp) => response,
            };
            if let Some(response) = response {
                if let Err(error) = socket.send_to(&response, peer).await {
                    tracing::debug!(%peer, %error, "Could not send a DNS answer");
                }
            }
        });
    }
}

/// Accepts TCP connections on `listener` until `cancel` fires.
pub(crate) async fn run_tcp(
    listener: TcpListener,
    responder: Arc<Responder>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Could not accept a DNS TCP connection");
                    // Usually out of file descriptors: give other tasks a moment to release some.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "Too many DNS TCP connections; closing one");
            continue;
        };
        let (responder, cancel) = (responder.clone(), cancel.clone());
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = run_tcp_connection(stream, peer, &responder) => {}
            }
        });
    }
}

/// Serves length-prefixed messages (RFC 1035 §4.2.2) one after another until the peer closes, is idle
/// for [`TCP_IDLE_TIMEOUT`], or sends something that cannot be framed.
async fn run_tcp_connection(mut stream: TcpStream, peer: SocketAddr, responder: &Responder) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        let mut packet = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(response) = responder.respond(&packet, Transport::Tcp).await else {
            continue;
        };
        let Ok(prefix) = u16::try_from(response.len()) else {
            tracing::warn!(%peer, "DNS answer too large for TCP framing; closing");
            return;
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&prefix.to_be_bytes());
        framed.extend_from_slice(&response);
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
