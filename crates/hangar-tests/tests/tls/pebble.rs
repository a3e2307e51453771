//! Pebble, Let's Encrypt's ACME test server, as a child process: generated configuration on free
//! ports, its own TLS certificate from a test CA, `-dnsserver` pointing at Hangar's DNS responder (so
//! DNS-01 TXT lookups go to Hangar), no artificial sleeps and no rejected nonces.
//!
//! Without a `pebble` binary the tests are skipped, except under CI (`CI` set), where they fail:
//! `.ci/run` installs Debian's `pebble` package.

use crate::support::{issue, TestCa};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Options of one Pebble instance.
#[derive(Default)]
pub struct PebbleOptions {
    /// Where Pebble resolves names (the DNS responder under test).
    pub dns_server: Option<SocketAddr>,
    /// The port Pebble fetches HTTP-01 answers from (the proxy's HTTP port).
    pub http_port: Option<u16>,
    /// Require External Account Binding with this key id and HMAC key (base64url).
    pub eab: Option<(String, String)>,
    /// Lifetime of issued certificates, in seconds (Pebble's default is about 5 years).
    pub validity_seconds: Option<u64>,
}

pub struct Pebble {
    child: Child,
    pub directory_url: url::Url,
    /// PEM of the CA that signed Pebble's own HTTPS certificate (the ACME client must trust it).
    pub ca_cert_path: PathBuf,
    management: SocketAddr,
    ca: TestCa,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Whether the Pebble binary is available; panics under CI when it is not.
pub fn available() -> bool {
    let found = std::process::Command::new("pebble")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "pebble is not installed (apt-get install pebble); the ACME tests cannot run under CI without it"
        );
        eprintln!("Skipping: pebble is not installed (apt-get install pebble)");
    }
    found
}

async fn free_port() -> u16 {
    hangar_tests::free_port().await
}

impl Pebble {
    /// Starts Pebble and waits until its directory answers.
    pub async fn start(options: PebbleOptions) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Pebble listener CA");
        let listener_cert = issue(&ca, &["localhost".into()], &["127.0.0.1"], 30);
        let cert_path = dir.path().join("pebble-cert.pem");
        let key_path = dir.path().join("pebble-key.pem");
        let ca_cert_path = dir.path().join("pebble-listener-ca.pem");
        std::fs::write(&cert_path, &listener_cert.cert_pem).unwrap();
        std::fs::write(&key_path, &listener_cert.key_pem).unwrap();
        std::fs::write(&ca_cert_path, ca.root_pem()).unwrap();

        let listen: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let http_port = match options.http_port {
            Some(port) => port,
            None => free_port().await,
        };
        let mut pebble = serde_json::json!({
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": cert_path,
            "privateKey": key_path,
            "httpPort": http_port,
            "tlsPort": free_port().await,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": options.eab.is_some(),
        });
        if let Some((kid, key)) = &options.eab {
            pebble["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        if let Some(validity) = options.validity_seconds {
            pebble["certificateValidityPeriod"] = validity.into();
        }
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(
            &config_path,
            serde_json::json!({ "pebble": pebble }).to_string(),
        )
        .unwrap();

        let log_path = dir.path().join("pebble.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new("pebble");
        command
            .arg("-config")
            .arg(&config_path)
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(dns) = options.dns_server {
            command.arg("-dnsserver").arg(dns.to_string());
        }
        let child = command.spawn().expect("cannot start pebble");
        let pebble = Pebble {
            child,
            directory_url: format!("https://{listen}/dir").parse().unwrap(),
            ca_cert_path,
            management,
            ca,
            log_path,
            _dir: dir,
        };
        pebble.wait_until_up().await;
        pebble
    }

    /// A client that trusts Pebble's listener certificate.
    fn client(&self) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(self.ca.root_pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(root)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    async fn wait_until_up(&self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = client.get(self.directory_url.clone()).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pebble did not start; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The root certificate Pebble issues under (PEM), from its management interface.
    pub async fn issuing_root(&self) -> String {
        let url = format!("https://{}/roots/0", self.management);
        let response = self.client().get(url).send().await.unwrap();
        assert!(response.status().is_success(), "GET /roots/0");
        response.text().await.unwrap()
    }

    /// What Pebble logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many orders Pebble received (counted from its log).
    pub fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }

    /// How many account creations Pebble received (counted from its log).
    pub fn account_requests(&self) -> usize {
        self.log().matches("POST /sign-me-up").count()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
