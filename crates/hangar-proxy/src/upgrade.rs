//! Upgraded connections (WebSockets): once both the client's and the backend's connections have
//! switched protocols, bytes are copied both ways until one side closes. The tunnel holds a
//! [`ConnectionGuard`], so the backend counts one open connection for exactly the tunnel's life.

use crate::connection_tracker::ConnectionGuard;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// After one direction ends, how long the other may still drain before the tunnel is dropped. Bounds
/// the life of half-closed tunnels whose peer never closes its side.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Runs one tunnel between the client and the backend until either side closes or `cancel` fires.
pub(crate) async fn run_tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    guard: ConnectionGuard,
    cancel: CancellationToken,
) {
    let upgraded = tokio::select! {
        _ = cancel.cancelled() => return,
        both = async { tokio::try_join!(client, backend) } => both,
    };
    let (client, backend) = match upgraded {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "Upgrade did not complete");
            return;
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = splice(TokioIo::new(client), TokioIo::new(backend)) => {}
    }
    drop(guard);
}

/// Copies `a` → `b` and `b` → `a`. When one direction reaches end of stream (or fails), the write
/// side it fed is shut down and the other direction gets [`HALF_CLOSE_LINGER`] to finish. Copy errors
/// only end the tunnel.
async fn splice<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let a_to_b = async {
        let _ = tokio::io::copy(&mut a_read, &mut b_write).await;
        let _ = b_write.shutdown().await;
    };
    let b_to_a = async {
        let _ = tokio::io::copy(&mut b_read, &mut a_write).await;
        let _ = a_write.shutdown().await;
    };
    tokio::pin!(a_to_b, b_to_a);
    tokio::select! {
        _ = &mut a_to_b => { let _ = tokio::time::timeout(HALF_CLOSE_LINGER, b_to_a).await; }
        _ = &mut b_to_a => { let _ = tokio::time::timeout(HALF_CLOSE_LINGER, a_to_b).await; }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn splice_copies_both_ways_and_ends_when_one_side_closes() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (mut client, proxy_a) = tokio::io::duplex(64);
            let (proxy_b, mut backend) = tokio::io::duplex(64);
            let tunnel = tokio::spawn(splice(proxy_a, proxy_b));
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            backend.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            backend.write_all(b"pong").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"pong");
            // The backend goes away; the client sees end of stream and the tunnel ends.
            drop(backend);
            assert_eq!(client.read(&mut buf).await.unwrap(), 0);
            drop(client);
            tunnel.await.unwrap();
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn half_closed_tunnel_ends_after_the_linger() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (client, proxy_a) = tokio::io::duplex(64);
            let (proxy_b, backend) = tokio::io::duplex(64);
            let tunnel = tokio::spawn(splice(proxy_a, proxy_b));
            // The client closes but the backend keeps its side open and silent.
            drop(client);
            tokio::time::timeout(HALF_CLOSE_LINGER * 2, tunnel)
                .await
                .expect("tunnel ends after the linger")
                .unwrap();
            drop(backend);
        })
        .await
        .expect("test timed out");
    }
}
