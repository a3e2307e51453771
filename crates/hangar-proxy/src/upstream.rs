//! Connections to backends. Two ways to send a request upstream:
//!
//! - the shared pool (hyper-util's client): any request, upgrades and HTTP/2 clients' requests;
//! - the backend connection *kept* by an HTTP/1.1 client connection: once a client connection sends
//!   a second plain request, it opens an HTTP/1.1 connection of its own to that backend and sends its
//!   plain requests there while the backend stays the same. A browser's or a load balancer's
//!   keep-alive connection talks to one backend, so this is the common case, and it costs no pool
//!   lock, no pool lookup and no background task per request (the pool spawns one per HTTP/1.1
//!   request to put the connection back once it is idle, and that wake-up crosses threads).
//!
//! An HTTP/1.1 client connection has one exchange at a time: its next request is read only after
//! the previous response was written, i.e. after the kept connection's response was read to its end
//! (the response's body puts the connection back then). The exchange runs in the request's own task
//! ([`h1`]), without hyper's client connection and the task and channel hops it needs. A kept
//! connection ends with its client connection. Requests are the same on both paths (origin-form URI,
//! the same headers, hyper's framing rules); errors are the same `ProxyError::Upstream`.

mod h1;

use crate::error::{BoxError, ProxyBody};
use h1::{ExchangeError, KeptBody, KeptStream, Slot};
use http::{Request, Response, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// The shared pool and what opening a kept connection needs.
pub(crate) struct Upstream {
    pub(crate) pool: Client<HttpConnector, ProxyBody>,
    pub(crate) connect_timeout: Duration,
}

/// The backend connection a client connection keeps, if any.
#[derive(Default)]
pub(crate) struct KeptConnection {
    slot: Slot,
}

#[derive(Default)]
pub(crate) enum Kept {
    /// No plain request yet: the first one goes through the pool (a client that sends one request
    /// per connection never costs an extra backend connection).
    #[default]
    Fresh,
    /// A plain request was seen; the next one opens a kept connection.
    Wanted,
    /// Idle or busy; `None` while a request has taken it out.
    Open(SocketAddr, Option<KeptStream>),
}

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Kept> {
    // A poisoned lock only means another thread panicked mid-update; the slot stays usable.
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Puts a connection whose response ended back into its client connection's slot.
fn put_back(slot: &Slot, addr: SocketAddr, stream: KeptStream) {
    let mut kept = lock(slot);
    match &mut *kept {
        Kept::Open(kept_addr, held) if *kept_addr == addr && held.is_none() => *held = Some(stream),
        Kept::Open(..) => {}
        Kept::Fresh | Kept::Wanted => *kept = Kept::Open(addr, Some(stream)),
    }
}

impl KeptConnection {
    /// What a plain request to `addr` should do.
    fn take(&self, addr: SocketAddr) -> Take {
        let mut kept = lock(&self.slot);
        match &mut *kept {
            Kept::Fresh => {
                *kept = Kept::Wanted;
                return Take::Pool;
            }
            Kept::Open(kept_addr, stream) if *kept_addr == addr => {
                if let Some(stream) = stream.take() {
                    return Take::Use(stream);
                }
            }
            // Wanted, or another backend now (keep a connection to the new one instead).
            Kept::Wanted | Kept::Open(..) => {}
        }
        // Until the new connection is put back, requests go through the pool; if it cannot be
        // opened, the request after next tries again (not every request: each attempt can take
        // the connect timeout).
        *kept = Kept::Fresh;
        Take::Open
    }
}

enum Take {
    Pool,
    Open,
    Use(KeptStream),
}

/// A response body from either path: the pool's (hyper's) or the kept connection's.
pub(crate) type UpstreamBody = Either<Incoming, KeptBody>;

impl Upstream {
    /// Sends a plain (not upgrading) request of an HTTP/1.x client connection, with an origin-form
    /// URI, to `addr`: on `kept` when it can.
    pub(crate) async fn send(
        &self,
        kept: &KeptConnection,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let stream = match kept.take(addr) {
            Take::Pool => None,
            // Closed by the backend meanwhile: the pool sends the request.
            Take::Use(stream) => stream.is_usable().then_some(stream),
            Take::Open => self.open(addr).await,
        };
        let Some(stream) = stream else {
            return self.send_pooled(addr, req).await;
        };
        match stream.exchange(req, kept.slot.clone(), addr).await {
            Ok(response) => Ok(response.map(Either::Right)),
            Err(ExchangeError::Unsent(req, error)) => {
                tracing::debug!(%error, %addr, "Kept backend connection failed; sending through the pool");
                self.send_pooled(addr, *req).await
            }
            Err(ExchangeError::Failed(error)) => Err(error),
        }
    }

    /// Sends `req` (origin-form URI) through the shared pool.
    pub(crate) async fn send_pooled(
        &self,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let path = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(addr.to_string().parse()?);
        parts.path_and_query = path;
        *req.uri_mut() = Uri::from_parts(parts)?;
        Ok(self.pool.request(req).await?.map(Either::Left))
    }

    /// A new connection to `addr` for a client connection to keep; `None` when it cannot be opened
    /// (the pool then tries, and reports the error as for any request).
    async fn open(&self, addr: SocketAddr) -> Option<KeptStream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let _ = stream.set_nodelay(true);
        Some(KeptStream::new(stream))
    }
}
