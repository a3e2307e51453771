//! `hangar dns` (Plane §1.2.4): the ACME DNS-01 responder, answering TXT queries for challenge names
//! with the value the cluster's proxy stored at the controller, on UDP and TCP.

use crate::serve::bind_listener;
use crate::shutdown::StopSignals;
use anyhow::Context;
use clap::Args;
use hangar_dns::DnsConfig;
use hangar_types::DnsName;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use tokio::net::UdpSocket;
use url::Url;

#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Controller URL to connect to (`http(s)://[TOKEN@]host:port`; `host:port` means
    /// `http://host:port`).
    #[arg(long, env = "HANGAR_CONTROLLER_URL", value_parser = crate::cli::parse_controller_url)]
    pub controller_url: Url,
    /// The zone delegated to this responder: a TXT query for `<cluster>.<zone>` (the target of the
    /// CNAME `_acme-challenge.<cluster>`) answers the challenge of `<cluster>`. Without it, queries
    /// must be for `_acme-challenge.<cluster>` itself.
    #[arg(long, env = "HANGAR_DNS_ZONE")]
    pub zone: Option<String>,
    /// UDP and TCP port. Ports below 1024 need root or CAP_NET_BIND_SERVICE.
    #[arg(long, env = "HANGAR_DNS_PORT", default_value_t = hangar_dns::DEFAULT_PORT)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, env = "HANGAR_DNS_HOST", default_value_t = hangar_dns::DEFAULT_HOST)]
    pub host: IpAddr,
    /// Responder name (`ns-…`). Default: random.
    #[arg(long, env = "HANGAR_DNS_NAME")]
    pub name: Option<DnsName>,
}

impl DnsArgs {
    pub fn to_config(&self) -> DnsConfig {
        let mut config = DnsConfig::new(self.controller_url.clone(), self.zone.clone());
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config.host = self.host;
        config.port = self.port;
        config
    }
}

pub async fn run_dns(args: DnsArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config();
    config.validate().context("invalid DNS configuration")?;
    let addr = SocketAddr::new(config.host, config.port);
    let udp = UdpSocket::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}/udp for the DNS responder: the port is already in use; \
             choose another port with --port"
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot listen on {addr}/udp for the DNS responder: permission denied \
             (ports below 1024 need root or CAP_NET_BIND_SERVICE); choose another port with --port"
        ),
        _ => anyhow::Error::new(e).context(format!("cannot listen on {addr}/udp")),
    })?;
    let tcp = bind_listener(addr, "DNS responder (TCP)", "--port").await?;
    let mut signals = StopSignals::install()?;
    let dns = hangar_dns::start_with_controller(config, udp, tcp)
        .await
        .context("starting the DNS responder")?;
    let signal = signals.recv().await;
    tracing::info!(signal, "Shutting down");
    dns.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_args() {
        let dns: DnsArgs = crate::parse_flags(&[
            "--controller-url",
            "http://ctrl:8080",
            "--zone",
            "acme.example.com",
        ])
        .unwrap();
        let c = dns.to_config();
        assert_eq!(c.port, 53);
        assert_eq!(c.host, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.zone.as_deref(), Some("acme.example.com"));
        assert!(c.name.as_str().starts_with("ns-"));
        assert!(c.validate().is_ok());
        let dns: DnsArgs = crate::parse_flags(&[
            "--controller-url",
            "http://ctrl:8080",
            "--port",
            "5353",
            "--host",
            "127.0.0.1",
        ])
        .unwrap();
        assert_eq!(dns.to_config().bind_addr().to_string(), "127.0.0.1:5353");
        assert!(crate::parse_flags::<DnsArgs>(&[]).is_err());
        let bad_zone: DnsArgs = crate::parse_flags(&[
            "--controller-url",
            "http://ctrl:8080",
            "--zone",
            "not a zone",
        ])
        .unwrap();
        assert!(bad_zone.to_config().validate().is_err());
    }
}
