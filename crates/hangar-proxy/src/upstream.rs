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
//! the previous response was written, i.e. after the kept connection's response was read to its end,
//! so waiting for the kept connection to be ready waits for nothing but its own bookkeeping (or
//! learns that the backend closed it; the pool then sends the request). A kept connection ends with
//! its client connection. Requests are the same on both paths (origin-form URI, the same headers);
//! errors are the same `ProxyError::Upstream`.

use crate::error::{BoxError, ProxyBody};
use crate::signal::or_signal;
use futures_util::future::Either;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shared pool and what opening a kept connection needs.
pub(crate) struct Upstream {
    pub(crate) pool: Client<HttpConnector, ProxyBody>,
    pub(crate) connect_timeout: Duration,
    /// Where kept connections' tasks run, and what ends them.
    pub(crate) tasks: TaskTracker,
    pub(crate) cancel: CancellationToken,
}

/// The backend connection a client connection keeps, if any.
#[derive(Default)]
pub(crate) struct KeptConnection {
    slot: Mutex<Kept>,
}

#[derive(Default)]
enum Kept {
    /// No plain request yet: the first one goes through the pool (a client that sends one request
    /// per connection never costs an extra backend connection).
    #[default]
    Fresh,
    /// A plain request was seen; the next one opens a kept connection.
    Wanted,
    /// Idle or busy; `None` while a request has taken it out.
    Open(SocketAddr, Option<SendRequest<ProxyBody>>),
}

impl KeptConnection {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // A poisoned lock only means another thread panicked mid-update; the slot stays usable.
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a plain request to `addr` should do.
    fn take(&self, addr: SocketAddr) -> Take {
        let mut kept = self.lock();
        match &mut *kept {
            Kept::Fresh => {
                *kept = Kept::Wanted;
                return Take::Pool;
            }
            Kept::Open(kept_addr, sender) if *kept_addr == addr => {
                if let Some(sender) = sender.take() {
                    return Take::Use(sender);
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

    fn put_back(&self, addr: SocketAddr, sender: SendRequest<ProxyBody>) {
        let mut kept = self.lock();
        match &mut *kept {
            Kept::Open(kept_addr, slot) if *kept_addr == addr && slot.is_none() => {
                *slot = Some(sender)
            }
            Kept::Open(..) => {}
            Kept::Fresh | Kept::Wanted => *kept = Kept::Open(addr, Some(sender)),
        }
    }
}

enum Take {
    Pool,
    Open,
    Use(SendRequest<ProxyBody>),
}

impl Upstream {
    /// Sends a plain (not upgrading) request of an HTTP/1.x client connection, with an origin-form
    /// URI, to `addr`: on `kept` when it can.
    pub(crate) async fn send(
        &self,
        kept: &KeptConnection,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let sender = match kept.take(addr) {
            Take::Pool => None,
            Take::Use(mut sender) => match sender.ready().await {
                Ok(()) => Some(sender),
                // The backend closed it.
                Err(_) => None,
            },
            Take::Open => self.open(addr).await,
        };
        let Some(mut sender) = sender else {
            return self.send_pooled(addr, req).await;
        };
        match sender.try_send_request(req).await {
            Ok(response) => {
                kept.put_back(addr, sender);
                Ok(response)
            }
            Err(mut error) => match error.take_message() {
                // Not sent (the connection closed meanwhile): the pool sends it.
                Some(req) => self.send_pooled(addr, req).await,
                None => Err(error.into_error().into()),
            },
        }
    }

    /// Sends `req` (origin-form URI) through the shared pool.
    pub(crate) async fn send_pooled(
        &self,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let path = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(addr.to_string().parse()?);
        parts.path_and_query = path;
        *req.uri_mut() = Uri::from_parts(parts)?;
        Ok(self.pool.request(req).await?)
    }

    /// A new connection to `addr` for a client connection to keep; `None` when it cannot be opened
    /// (the pool then tries, and reports the error as for any request).
    async fn open(&self, addr: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            // Ends when the sender is dropped (with its client connection) or the backend closes.
            if let Either::Left(Err(error)) = or_signal(connection, cancel.cancelled_owned()).await
            {
                tracing::debug!(%error, %addr, "Kept backend connection ended with an error");
            }
        });
        Some(sender)
    }
}
