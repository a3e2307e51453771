//! Hangar's ACME DNS-01 responder (`hangar dns`, Plane §7.9.4): a minimal authoritative DNS server on
//! UDP and TCP that answers only TXT queries for challenge names, with the value the cluster's proxy
//! stored at the controller. A query for `<cluster>.<zone>` (or `_acme-challenge.<cluster>` without a
//! zone) returns that value with TTL 1 s and the authoritative flag; a cluster without a value gets an
//! empty NOERROR answer, other names FORMERR, other query types NOTIMP, unparseable requests FORMERR,
//! and a lookup that fails or outlasts [`DnsConfig::lookup_timeout`] SERVFAIL.
//!
//! Boundary: the responder holds no state of its own; values come from a [`TxtSource`], in production
//! [`ControllerTxtSource`], which talks to the controller only through `hangar-client`'s node session.

mod challenge_name;
mod config;
mod controller_source;
mod responder;
mod server;
mod txt_source;

pub use challenge_name::{ChallengeNames, NameMismatch, CHALLENGE_PREFIX};
pub use config::{ConfigError, DnsConfig, DEFAULT_HOST, DEFAULT_LOOKUP_TIMEOUT, DEFAULT_PORT};
pub use controller_source::{ControllerTxtSource, DNS_SOCKET_PATH};
pub use responder::TXT_TTL_SECONDS;
pub use txt_source::{TxtError, TxtSource};

use anyhow::Context;
use hangar_client::ControllerClient;
use responder::Responder;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Starts answering on `udp` and `tcp` (bind them first, usually to [`DnsConfig::bind_addr`]; tests
/// use port 0) with values from `source`. `config.controller_url` is not used here: the caller built
/// `source`.
pub async fn start(
    config: DnsConfig,
    source: Arc<dyn TxtSource>,
    udp: UdpSocket,
    tcp: TcpListener,
) -> anyhow::Result<DnsHandle> {
    start_with(config, source, udp, tcp, Lifecycle::new())
}

/// [`start`] with a [`ControllerTxtSource`] connected to `config.controller_url`: what `hangar dns`
/// runs. The handle's [`DnsHandle::shutdown`] also ends the controller session.
pub async fn start_with_controller(
    config: DnsConfig,
    udp: UdpSocket,
    tcp: TcpListener,
) -> anyhow::Result<DnsHandle> {
    config.validate().context("invalid DNS configuration")?;
    let client =
        ControllerClient::new(config.controller_url.clone()).context("invalid controller URL")?;
    let lifecycle = Lifecycle::new();
    let source = ControllerTxtSource::start(
        client,
        config.name.clone(),
        lifecycle.cancel.child_token(),
        &lifecycle.tasks,
    );
    start_with(config, source, udp, tcp, lifecycle)
}

/// The cancellation token and task tracker every task of one responder runs under.
struct Lifecycle {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Lifecycle {
    fn new() -> Self {
        Lifecycle {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}

fn start_with(
    config: DnsConfig,
    source: Arc<dyn TxtSource>,
    udp: UdpSocket,
    tcp: TcpListener,
    Lifecycle { cancel, tasks }: Lifecycle,
) -> anyhow::Result<DnsHandle> {
    let fail = |error: anyhow::Error| {
        // Stops a controller session already started by the caller.
        cancel.cancel();
        error
    };
    config
        .validate()
        .context("invalid DNS configuration")
        .map_err(fail)?;
    let names = ChallengeNames::new(config.zone.as_deref())
        .context("invalid zone")
        .map_err(fail)?;
    let udp_addr = udp
        .local_addr()
        .context("DNS UDP socket has no local address")
        .map_err(fail)?;
    let tcp_addr = tcp
        .local_addr()
        .context("DNS TCP listener has no local address")
        .map_err(fail)?;
    let responder = Arc::new(Responder::new(names, source, config.lookup_timeout));
    tasks.spawn(server::run_udp(
        Arc::new(udp),
        responder.clone(),
        cancel.clone(),
        tasks.clone(),
    ));
    tasks.spawn(server::run_tcp(
        tcp,
        responder,
        cancel.clone(),
        tasks.clone(),
    ));
    tracing::info!(%udp_addr, %tcp_addr, name = %config.name, zone = ?config.zone, "DNS responder started");
    Ok(DnsHandle {
        udp_addr,
        tcp_addr,
        cancel,
        tasks,
    })
}

/// A running DNS responder. Dropping it without [`DnsHandle::shutdown`] stops everything at once.
pub struct DnsHandle {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl DnsHandle {
    /// The UDP address the responder answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP address the responder answers on (the same as [`DnsHandle::local_addr`] unless the
    /// sockets were bound separately to port 0).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops answering (queries in flight get no answer; resolvers retry elsewhere) and ends the
    /// controller session, if this handle owns one.
    pub async fn shutdown(self) {
        tracing::info!("DNS responder shutting down");
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        tracing::info!("DNS responder stopped");
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
