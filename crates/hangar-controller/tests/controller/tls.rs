//! Cluster TLS through the proxy and DNS sockets: the certificate lease between proxies, TXT values
//! answered to DNS responders, HTTP-01 challenges and certificates pushed to every proxy of the cluster.

use crate::support::*;
use hangar_types::protocol::{
    ControllerToDns, ControllerToProxy, DnsHello, DnsToController, HelloResponse, ProxyToController,
};
use hangar_types::timing::CERT_LEASE;
use hangar_types::{ClusterName, DnsName, PROTOCOL_VERSION};
use std::time::Duration;

/// Asks for the cluster's certificate lease; whether it was granted.
pub async fn lease(proxy: &mut FakeProxy) -> bool {
    proxy.send(&ProxyToController::CertLeaseRequest).await;
    proxy
        .expect(|m| match m {
            ControllerToProxy::CertLeaseResponse { accepted } => Some(*accepted),
            _ => None,
        })
        .await
}

async fn set_txt(proxy: &mut FakeProxy, value: Option<&str>) -> bool {
    proxy
        .send(&ProxyToController::SetTxtRecord {
            txt_value: value.map(str::to_string),
        })
        .await;
    proxy
        .expect(|m| match m {
            ControllerToProxy::SetTxtRecordResponse { accepted } => Some(*accepted),
            _ => None,
        })
        .await
}

/// A DNS responder's session, past the handshake.
async fn dns_connect(ctl: &TestController) -> Ws {
    let mut ws = ctl.ws_connect("/ctrl/dns-socket").await;
    ws.send(&DnsHello {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
        name: DnsName::random(),
    })
    .await;
    let answer: HelloResponse = ws.recv().await.expect("no hello response");
    assert!(
        matches!(answer, HelloResponse::Welcome { .. }),
        "{answer:?}"
    );
    ws
}

async fn txt(dns: &mut Ws, cluster: &str) -> Option<String> {
    let cluster: ClusterName = cluster.parse().unwrap();
    dns.send(&DnsToController::TxtRecordRequest {
        cluster: cluster.clone(),
    })
    .await;
    let mut skipped = Vec::new();
    dns.recv_until(&mut skipped, |m: &ControllerToDns| match m {
        ControllerToDns::TxtRecordResponse {
            cluster: c,
            txt_value,
        } if *c == cluster => Some(txt_value.clone()),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn dns_socket_refuses_bad_hellos() {
    with_controller(async |ctl| {
        for bad in [
            r#"{"protocol": 999, "version": "x", "name": "dns-abc"}"#.to_string(),
            // A drone's hello is not a DNS hello.
            serde_json::to_string(&hangar_types::protocol::Hello {
                protocol: PROTOCOL_VERSION,
                version: "x".into(),
                node: hangar_types::protocol::NodeHello::Proxy {
                    name: hangar_types::ProxyName::random(),
                },
            })
            .unwrap(),
            "garbage".to_string(),
        ] {
            let mut ws = ctl.ws_connect("/ctrl/dns-socket").await;
            ws.send_raw(&bad).await;
            let answer: HelloResponse = ws.recv().await.expect("no hello response");
            assert!(
                matches!(answer, HelloResponse::Refused { .. }),
                "{bad}: {answer:?}"
            );
            assert!(ws.recv::<serde_json::Value>().await.is_none(), "closed");
        }
    })
    .await
}

#[tokio::test]
async fn dns_socket_answers_txt_values_set_by_the_lease_holder() {
    with_controller(async |ctl| {
        let mut dns = dns_connect(ctl).await;
        assert_eq!(txt(&mut dns, CLUSTER).await, None);

        let mut proxy = FakeProxy::connect(ctl).await;
        assert!(!set_txt(&mut proxy, Some("early")).await, "no lease yet");
        assert!(lease(&mut proxy).await);
        assert_eq!(txt(&mut dns, CLUSTER).await, None, "no value yet");
        assert!(set_txt(&mut proxy, Some("dns-01-value")).await);
        assert_eq!(
            txt(&mut dns, CLUSTER).await.as_deref(),
            Some("dns-01-value")
        );
        // Other clusters have none.
        assert_eq!(txt(&mut dns, "other.example.com").await, None);
        // Garbage does not end the session; bad values are refused.
        dns.send_raw("{]").await;
        dns.send_raw(r#"{"TxtRecordRequest": {"cluster": "bad host"}}"#)
            .await;
        assert!(!set_txt(&mut proxy, Some("has space")).await);
        assert!(!set_txt(&mut proxy, Some(&"x".repeat(300))).await);
        assert_eq!(
            txt(&mut dns, CLUSTER).await.as_deref(),
            Some("dns-01-value")
        );
        // Cleared, then gone with the lease.
        assert!(set_txt(&mut proxy, None).await);
        assert_eq!(txt(&mut dns, CLUSTER).await, None);
        assert!(set_txt(&mut proxy, Some("again")).await);
        proxy.send(&ProxyToController::ReleaseCertLease).await;
        eventually("TXT value released with the lease", || async {
            ctl.store
                .txt_record(&CLUSTER.parse().unwrap())
                .await
                .unwrap()
                .is_none()
                .then_some(())
        })
        .await;
        assert_eq!(txt(&mut dns, CLUSTER).await, None);
    })
    .await
}

#[tokio::test]
async fn cert_lease_is_held_by_one_proxy_at_a_time() {
    with_controller(async |ctl| {
        let mut p1 = FakeProxy::connect(ctl).await;
        let mut p2 = FakeProxy::connect(ctl).await;
        assert!(lease(&mut p1).await);
        assert!(!lease(&mut p2).await);
        // The holder renews (Plane could not, quirk 22).
        assert!(lease(&mut p1).await);
        assert!(set_txt(&mut p1, Some("mine")).await);
        assert!(!set_txt(&mut p2, Some("theirs")).await);

        // Released (the session handles frames in order, so the refused TXT value proves it): the other
        // proxy gets it.
        p1.send(&ProxyToController::ReleaseCertLease).await;
        assert!(!set_txt(&mut p1, Some("gone")).await);
        assert!(lease(&mut p2).await);
        assert!(!lease(&mut p1).await);

        // Expired (its holder stopped renewing): taken over.
        ctl.advance_clock(CERT_LEASE + Duration::from_secs(1)).await;
        assert!(lease(&mut p1).await);
        assert!(!lease(&mut p2).await);
        assert!(!set_txt(&mut p2, Some("late")).await);
    })
    .await
}

fn challenge(token: &str, key: Option<&str>) -> ControllerToProxy {
    ControllerToProxy::HttpChallenge {
        token: token.into(),
        key_authorization: key.map(str::to_string),
    }
}

#[tokio::test]
async fn challenges_and_certificates_reach_every_proxy_of_the_cluster() {
    with_controller(async |ctl| {
        let mut holder = FakeProxy::connect(ctl).await;
        let mut other = FakeProxy::connect(ctl).await;
        let mut elsewhere = FakeProxy::connect_in(ctl, "other.example.com").await;
        assert!(lease(&mut holder).await);

        // Not the holder, or invalid: ignored. Then the holder's challenge reaches both proxies.
        other
            .send(&ProxyToController::SetHttpChallenge {
                token: "stolen".into(),
                key_authorization: Some("stolen.x".into()),
            })
            .await;
        holder
            .send(&ProxyToController::SetHttpChallenge {
                token: "bad/token".into(),
                key_authorization: Some("x".into()),
            })
            .await;
        holder
            .send(&ProxyToController::SetHttpChallenge {
                token: "tok1".into(),
                key_authorization: Some("tok1.thumb".into()),
            })
            .await;
        let expected = challenge("tok1", Some("tok1.thumb"));
        for proxy in [&mut holder, &mut other] {
            let got = proxy
                .expect(|m| matches!(m, ControllerToProxy::HttpChallenge { .. }).then(|| m.clone()))
                .await;
            assert_eq!(got, expected, "the first challenge pushed is the holder's");
        }

        // A certificate stored by the holder reaches both proxies of the cluster.
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        holder
            .send(&ProxyToController::StoreCertificate {
                cert_pem: "not a pem".into(),
                key_pem: key.into(),
            })
            .await;
        holder
            .send(&ProxyToController::StoreCertificate {
                cert_pem: cert.into(),
                key_pem: key.into(),
            })
            .await;
        let certificate = ControllerToProxy::Certificate {
            cert_pem: cert.into(),
            key_pem: key.into(),
        };
        for proxy in [&mut holder, &mut other] {
            let got = proxy
                .expect(|m| matches!(m, ControllerToProxy::Certificate { .. }).then(|| m.clone()))
                .await;
            assert_eq!(got, certificate);
        }

        // A proxy connecting later gets the certificate and the open challenge right away.
        let mut late = FakeProxy::connect(ctl).await;
        let first: ControllerToProxy = late.ws.recv().await.unwrap();
        assert_eq!(first, certificate);
        let second: ControllerToProxy = late.ws.recv().await.unwrap();
        assert_eq!(second, expected);

        // Withdrawn: every proxy of the cluster is told.
        holder
            .send(&ProxyToController::SetHttpChallenge {
                token: "tok1".into(),
                key_authorization: None,
            })
            .await;
        let withdrawn = challenge("tok1", None);
        for proxy in [&mut holder, &mut other, &mut late] {
            let got = proxy.expect(|m| (*m == withdrawn).then_some(())).await;
            assert_eq!(got, ());
        }

        // The proxy of another cluster heard none of it.
        elsewhere
            .send(&ProxyToController::RouteRequest {
                token: hangar_types::token::ConnectionToken::from_path_segment("probe"),
            })
            .await;
        let mut skipped = Vec::new();
        elsewhere
            .ws
            .recv_until(&mut skipped, |m: &ControllerToProxy| {
                matches!(m, ControllerToProxy::RouteResponse { .. }).then_some(())
            })
            .await;
        assert!(skipped.is_empty(), "{skipped:?}");
    })
    .await
}
