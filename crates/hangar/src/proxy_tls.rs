//! `hangar proxy`'s HTTPS flags (Plane §1.2.3): `--https`, `--https-port`, `--cert-path`, the
//! `--acme-*` flags, and Plane's rules for which ports the proxy listens on.
//!
//! The flags override the `--config` file's `cert_path`, `key_path` and `acme` fields (an `acme` table
//! in the file keeps its other fields when a flag changes one).

use anyhow::Context;
use clap::Args;
use hangar_proxy::{AcmeChallenge, AcmeConfig, EabConfig, ProxyConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use url::Url;

/// HTTP port with `--https` and no `--http-port` (Plane's rule).
const HTTPS_MODE_HTTP_PORT: u16 = 80;
/// HTTPS port with `--https` and no `--https-port`.
const DEFAULT_HTTPS_PORT: u16 = 443;

#[derive(Debug, Clone, Default, Args)]
pub struct ProxyTlsArgs {
    /// Serve HTTPS: on port 443 unless --https-port, with the HTTP port (80 unless --http-port)
    /// redirecting to it. Needs a certificate: --cert-path, ACME (--acme-endpoint), or the cluster's
    /// certificate shared by another proxy through the controller.
    #[arg(long, env = "HANGAR_HTTPS")]
    pub https: bool,
    /// HTTPS port; giving it turns HTTPS on (the HTTP port is then 80 unless --http-port).
    #[arg(long, env = "HANGAR_HTTPS_PORT")]
    pub https_port: Option<u16>,
    /// Certificate file: Plane's JSON `{"cert": "<PEM chain>", "key": "<PEM key>"}`, or PEM with the
    /// chain and the key. Reloaded when it changes; ACME writes new certificates to it.
    #[arg(long, env = "HANGAR_CERT_PATH")]
    pub cert_path: Option<PathBuf>,
    /// The private key as its own PEM file, for a PEM --cert-path without the key.
    #[arg(long, env = "HANGAR_KEY_PATH")]
    pub key_path: Option<PathBuf>,
    /// ACME directory URL (e.g. https://acme-v02.api.letsencrypt.org/directory); needs --acme-email.
    #[arg(long, env = "HANGAR_ACME_ENDPOINT")]
    pub acme_endpoint: Option<Url>,
    /// Contact address of the ACME account; needs --acme-endpoint.
    #[arg(long, env = "HANGAR_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// External Account Binding key id; give it together with --acme-eab-hmac-key.
    #[arg(long, env = "HANGAR_ACME_EAB_KID")]
    pub acme_eab_kid: Option<String>,
    /// External Account Binding HMAC key, base64url without padding.
    #[arg(long, env = "HANGAR_ACME_EAB_HMAC_KEY", hide_env_values = true)]
    pub acme_eab_hmac_key: Option<String>,
    /// ACME challenge: dns-01 (certificate for the cluster and *.cluster, answered by `hangar dns`)
    /// or http-01 (the cluster name only, answered on the HTTP port). Default: dns-01.
    #[arg(long, env = "HANGAR_ACME_CHALLENGE", value_enum)]
    pub acme_challenge: Option<ChallengeArg>,
    /// PEM file with the root certificate to trust for the ACME server instead of the system's
    /// (a test CA such as Pebble's).
    #[arg(long, env = "HANGAR_ACME_CA_CERT")]
    pub acme_ca_cert: Option<PathBuf>,
}

/// `--acme-challenge` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChallengeArg {
    #[value(name = "dns-01")]
    Dns01,
    #[value(name = "http-01")]
    Http01,
}

impl ChallengeArg {
    fn kind(self) -> AcmeChallenge {
        match self {
            ChallengeArg::Dns01 => AcmeChallenge::Dns01,
            ChallengeArg::Http01 => AcmeChallenge::Http01,
        }
    }
}

/// Where the proxy listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyPorts {
    pub http: u16,
    pub https: Option<u16>,
}

/// Plane's port rules, in order: no HTTPS and no ports → HTTP on `http_only_default`; `--https`
/// alone → 80 and 443; `--https --http-port X` → X and 443; `--https-port Y` without `--http-port` →
/// 80 and Y; `--http-port X [--https-port Y]` → X and Y (or no HTTPS).
pub fn ports(
    https: bool,
    http_port: Option<u16>,
    https_port: Option<u16>,
    http_only_default: u16,
) -> ProxyPorts {
    let (http, https) = match (https, http_port, https_port) {
        (false, None, None) => (http_only_default, None),
        (true, None, None) => (HTTPS_MODE_HTTP_PORT, Some(DEFAULT_HTTPS_PORT)),
        (true, Some(x), None) => (x, Some(DEFAULT_HTTPS_PORT)),
        (_, None, Some(y)) => (HTTPS_MODE_HTTP_PORT, Some(y)),
        (_, Some(x), y) => (x, y),
    };
    ProxyPorts { http, https }
}

/// The proxy's configuration and listen addresses.
#[derive(Debug)]
pub struct ProxySetup {
    pub config: ProxyConfig,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
}

impl ProxySetup {
    pub fn new(config: ProxyConfig, host: IpAddr, ports: ProxyPorts) -> anyhow::Result<Self> {
        if ports.https.is_none() && (config.cert_path.is_some() || config.acme.is_some()) {
            anyhow::bail!(
                "a certificate (--cert-path or --acme-endpoint) is configured but HTTPS is off; \
                 add --https or --https-port"
            );
        }
        if ports.https == Some(ports.http) {
            anyhow::bail!(
                "the HTTP and HTTPS ports are both {}; choose different ports with --http-port and --https-port",
                ports.http
            );
        }
        Ok(ProxySetup {
            config,
            http: SocketAddr::new(host, ports.http),
            https: ports.https.map(|port| SocketAddr::new(host, port)),
        })
    }
}

impl ProxyTlsArgs {
    /// Lays the certificate flags over `config` (which holds the file's values).
    pub fn apply(&self, config: &mut ProxyConfig) -> anyhow::Result<()> {
        if let Some(path) = &self.cert_path {
            config.cert_path = Some(path.clone());
        }
        if let Some(path) = &self.key_path {
            config.key_path = Some(path.clone());
        }
        let eab = match (&self.acme_eab_kid, &self.acme_eab_hmac_key) {
            (Some(key_id), Some(hmac_key)) => Some(EabConfig {
                key_id: key_id.clone(),
                hmac_key: hmac_key.clone(),
            }),
            (None, None) => None,
            _ => anyhow::bail!(
                "Must specify both --acme-eab-hmac-key and --acme-eab-kid or neither."
            ),
        };
        let acme = match (&mut config.acme, &self.acme_endpoint, &self.acme_email) {
            (Some(acme), endpoint, email) => {
                if let Some(endpoint) = endpoint {
                    acme.directory_url = endpoint.clone();
                }
                if let Some(email) = email {
                    acme.email = email.clone();
                }
                Some(acme)
            }
            (None, Some(endpoint), Some(email)) => Some(
                config
                    .acme
                    .insert(AcmeConfig::new(endpoint.clone(), email.clone())),
            ),
            (None, Some(_), None) => {
                anyhow::bail!("Must specify --acme-email when using --acme-endpoint.")
            }
            (None, None, Some(_)) => {
                anyhow::bail!("Must specify --acme-endpoint when using --acme-email.")
            }
            (None, None, None) => None,
        };
        match acme {
            Some(acme) => {
                if eab.is_some() {
                    acme.eab = eab;
                }
                if let Some(challenge) = self.acme_challenge {
                    acme.challenge = challenge.kind();
                }
                if let Some(path) = &self.acme_ca_cert {
                    acme.ca_cert_path = Some(path.clone());
                }
            }
            None => {
                if eab.is_some() || self.acme_challenge.is_some() || self.acme_ca_cert.is_some() {
                    anyhow::bail!(
                        "--acme-eab-kid, --acme-eab-hmac-key, --acme-challenge and --acme-ca-cert need --acme-endpoint and --acme-email"
                    );
                }
            }
        }
        if let Some(acme) = &config.acme {
            acme.validate().context("invalid ACME settings")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> ProxyTlsArgs {
        crate::parse_flags(flags).unwrap()
    }

    fn config() -> ProxyConfig {
        ProxyConfig::new(
            "http://ctrl:8080/".parse().unwrap(),
            "plane.test".parse().unwrap(),
        )
    }

    fn apply(flags: &[&str]) -> anyhow::Result<ProxyConfig> {
        let mut c = config();
        args(flags).apply(&mut c)?;
        Ok(c)
    }

    #[test]
    fn plane_port_rules() {
        let p = |https, http, https_port| ports(https, http, https_port, 9090);
        let ports_of = |http, https| ProxyPorts { http, https };
        assert_eq!(p(false, None, None), ports_of(9090, None));
        assert_eq!(p(true, None, None), ports_of(80, Some(443)));
        assert_eq!(p(true, Some(8080), None), ports_of(8080, Some(443)));
        assert_eq!(p(false, None, Some(8443)), ports_of(80, Some(8443)));
        assert_eq!(p(true, None, Some(8443)), ports_of(80, Some(8443)));
        assert_eq!(p(false, Some(8080), None), ports_of(8080, None));
        assert_eq!(p(false, Some(8080), Some(8443)), ports_of(8080, Some(8443)));
        assert_eq!(p(true, Some(8080), Some(8443)), ports_of(8080, Some(8443)));
    }

    #[test]
    fn setup_refuses_certificates_without_https_and_equal_ports() {
        let host = IpAddr::from([0, 0, 0, 0]);
        let mut c = config();
        c.cert_path = Some("cert.json".into());
        let err = ProxySetup::new(c.clone(), host, ports(false, None, None, 9090)).unwrap_err();
        assert!(err.to_string().contains("HTTPS is off"), "{err}");
        let setup = ProxySetup::new(c.clone(), host, ports(true, None, None, 9090)).unwrap();
        assert_eq!(setup.http.port(), 80);
        assert_eq!(setup.https.map(|a| a.port()), Some(443));
        let err = ProxySetup::new(c, host, ports(true, Some(443), None, 9090)).unwrap_err();
        assert!(err.to_string().contains("both 443"), "{err}");
    }

    #[test]
    fn acme_flags_with_plane_errors() {
        let c = apply(&[
            "--acme-endpoint",
            "https://acme.test/dir",
            "--acme-email",
            "ops@plane.test",
            "--acme-challenge",
            "http-01",
            "--acme-ca-cert",
            "/tmp/ca.pem",
            "--acme-eab-kid",
            "kid-1",
            "--acme-eab-hmac-key",
            "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
            "--cert-path",
            "/var/lib/hangar/cert.json",
        ])
        .unwrap();
        let acme = c.acme.unwrap();
        assert_eq!(acme.directory_url.as_str(), "https://acme.test/dir");
        assert_eq!(acme.email, "ops@plane.test");
        assert_eq!(acme.challenge, AcmeChallenge::Http01);
        assert_eq!(acme.ca_cert_path, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(acme.eab.unwrap().key_id, "kid-1");
        assert_eq!(
            c.cert_path,
            Some(PathBuf::from("/var/lib/hangar/cert.json"))
        );

        let message = |flags: &[&str]| apply(flags).unwrap_err().to_string();
        assert_eq!(
            message(&["--acme-endpoint", "https://acme.test/dir"]),
            "Must specify --acme-email when using --acme-endpoint."
        );
        assert_eq!(
            message(&["--acme-email", "a@b.c"]),
            "Must specify --acme-endpoint when using --acme-email."
        );
        assert_eq!(
            message(&[
                "--acme-endpoint",
                "https://acme.test/dir",
                "--acme-email",
                "a@b.c",
                "--acme-eab-kid",
                "kid"
            ]),
            "Must specify both --acme-eab-hmac-key and --acme-eab-kid or neither."
        );
        let bad_key = format!(
            "{:#}",
            apply(&[
                "--acme-endpoint",
                "https://acme.test/dir",
                "--acme-email",
                "a@b.c",
                "--acme-eab-kid",
                "kid",
                "--acme-eab-hmac-key",
                "not base64!",
            ])
            .unwrap_err()
        );
        assert!(bad_key.contains("base64url"), "{bad_key}");
        assert!(message(&["--acme-challenge", "dns-01"]).contains("need --acme-endpoint"));
        assert!(crate::parse_flags::<ProxyTlsArgs>(&["--acme-challenge", "tls-alpn-01"]).is_err());
    }

    #[test]
    fn flags_override_an_acme_table_from_the_file() {
        let mut c = config();
        let mut from_file = AcmeConfig::new(
            "https://file.test/dir".parse().unwrap(),
            "file@plane.test".into(),
        );
        from_file.challenge_wait = std::time::Duration::from_secs(9);
        c.acme = Some(from_file);
        args(&["--acme-email", "flag@plane.test"])
            .apply(&mut c)
            .unwrap();
        let acme = c.acme.unwrap();
        assert_eq!(acme.email, "flag@plane.test");
        assert_eq!(acme.directory_url.as_str(), "https://file.test/dir");
        assert_eq!(acme.challenge_wait, std::time::Duration::from_secs(9));
    }

    #[test]
    fn proxy_command_resolves_https_listeners() {
        let setup = |flags: &[&str]| {
            let base = [
                "--controller-url",
                "http://c:8080",
                "--cluster",
                "plane.test",
            ];
            let flags: Vec<&str> = base.iter().chain(flags.iter()).copied().collect();
            crate::parse_flags::<crate::serve::ProxyArgs>(&flags)
                .unwrap()
                .to_setup()
        };
        let s = setup(&["--https", "--cert-path", "/etc/hangar/cert.json"]).unwrap();
        assert_eq!(s.http.to_string(), "0.0.0.0:80");
        assert_eq!(s.https.unwrap().to_string(), "0.0.0.0:443");
        assert_eq!(
            s.config.cert_path,
            Some(PathBuf::from("/etc/hangar/cert.json"))
        );
        let s = setup(&["--https-port", "8443", "--http-port", "8080"]).unwrap();
        assert_eq!(
            (s.http.port(), s.https.map(|a| a.port())),
            (8080, Some(8443))
        );
        let s = setup(&[]).unwrap();
        assert_eq!((s.http.port(), s.https), (9090, None));
        let err = setup(&["--cert-path", "/etc/hangar/cert.json"]).unwrap_err();
        assert!(err.to_string().contains("HTTPS is off"), "{err}");
    }
}
