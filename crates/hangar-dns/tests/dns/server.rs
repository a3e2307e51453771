//! The responder over real sockets with a fake TXT source.

use crate::support::*;
use hangar_dns::DnsHandle;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

const ZONE: &str = "acme.example.net";

fn source() -> Arc<FakeSource> {
    let mut source = FakeSource::default();
    source
        .values
        .insert(cluster("c1.example.com"), "challenge-digest".into());
    source.hanging.push(cluster("slow.example.com"));
    Arc::new(source)
}

/// Runs `test` with [`with_timeout`] against the responder for [`ZONE`] on [`source`], with a 5 s
/// lookup timeout, and shuts the responder down after it.
async fn with_dns_in_zone(test: impl AsyncFnOnce(&DnsHandle)) {
    with_dns_timing_out(Duration::from_secs(5), test).await;
}

/// [`with_dns_in_zone`] with the lookup timeout `lookup_timeout`.
async fn with_dns_timing_out(lookup_timeout: Duration, test: impl AsyncFnOnce(&DnsHandle)) {
    with_timeout(async {
        let dns = start_dns(Some(ZONE), lookup_timeout, source()).await;
        test(&dns).await;
        dns.shutdown().await;
    })
    .await;
}

/// Asks `dns` over UDP for `name`'s record of `record_type`.
async fn ask(dns: &DnsHandle, name: &str, record_type: RecordType) -> hickory_proto::op::Message {
    udp_exchange(dns.local_addr(), &query(name, record_type)).await
}

/// Asks `dns` over UDP for `name`'s TXT record, expecting an authoritative answer without error.
async fn ask_authoritative(dns: &DnsHandle, name: &str) -> hickory_proto::op::Message {
    let answer = ask(dns, name, RecordType::TXT).await;
    assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
    assert!(answer.authoritative(), "{name}");
    answer
}

fn txt_strings(answer: &hickory_proto::op::Message) -> Vec<String> {
    answer
        .answers()
        .iter()
        .map(|record| match record.data() {
            RData::TXT(txt) => txt
                .txt_data()
                .iter()
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect::<String>(),
            other => panic!("expected TXT, got {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn txt_answer_over_udp_has_value_ttl_and_authority() {
    with_dns_in_zone(async |dns| {
        let answer = ask_authoritative(dns, "c1.example.com.acme.example.net.").await;
        assert_eq!(txt_strings(&answer), ["challenge-digest"]);
        assert_eq!(answer.answers()[0].ttl(), 1);
        assert_eq!(
            answer.answers()[0].name().to_ascii(),
            "c1.example.com.acme.example.net."
        );
    })
    .await
}

#[tokio::test]
async fn missing_value_is_an_empty_authoritative_answer() {
    with_dns_in_zone(async |dns| {
        let answer = ask_authoritative(dns, "c2.example.com.acme.example.net").await;
        assert!(answer.answers().is_empty());
    })
    .await
}

#[tokio::test]
async fn names_outside_the_zone_get_formerr() {
    with_dns_in_zone(async |dns| {
        // A cluster without the zone, a challenge name without it, another zone, the zone itself.
        let outside = [
            "c1.example.com.",
            "_acme-challenge.c1.example.com.",
            "c1.example.com.other.example.net.",
            "acme.example.net.",
        ];
        for name in outside {
            let answer = ask(dns, name, RecordType::TXT).await;
            assert_eq!(answer.response_code(), ResponseCode::FormErr, "{name}");
            assert!(answer.answers().is_empty(), "{name}");
        }
    })
    .await
}

#[tokio::test]
async fn without_zone_the_challenge_label_is_required() {
    with_timeout(async {
        let dns = start_dns(None, Duration::from_secs(5), source()).await;
        let answer = ask(&dns, "_acme-challenge.c1.example.com.", RecordType::TXT).await;
        assert_eq!(txt_strings(&answer), ["challenge-digest"]);
        let answer = ask(&dns, "c1.example.com.", RecordType::TXT).await;
        assert_eq!(answer.response_code(), ResponseCode::FormErr);
        dns.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn non_txt_queries_get_notimp() {
    with_dns_in_zone(async |dns| {
        for record_type in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::NS,
            RecordType::SOA,
        ] {
            let answer = ask(dns, "c1.example.com.acme.example.net.", record_type).await;
            assert_eq!(
                answer.response_code(),
                ResponseCode::NotImp,
                "{record_type}"
            );
            assert!(answer.answers().is_empty());
        }
    })
    .await
}

#[tokio::test]
async fn malformed_packet_gets_formerr() {
    with_dns_in_zone(async |dns| {
        let mut packet = query("c1.example.com.acme.example.net.", RecordType::TXT);
        // Claims a question whose name runs past the end of the packet.
        packet.truncate(20);
        let answer = udp_exchange(dns.local_addr(), &packet).await;
        assert_eq!(answer.response_code(), ResponseCode::FormErr);
        // The server keeps answering afterwards.
        let answer = ask(dns, "c1.example.com.acme.example.net.", RecordType::TXT).await;
        assert_eq!(txt_strings(&answer), ["challenge-digest"]);
    })
    .await
}

#[tokio::test]
async fn source_timeout_gets_servfail() {
    with_dns_timing_out(Duration::from_millis(200), async |dns| {
        let answer = ask(dns, "slow.example.com.acme.example.net.", RecordType::TXT).await;
        assert_eq!(answer.response_code(), ResponseCode::ServFail);
        assert!(answer.answers().is_empty());
    })
    .await;
}

#[tokio::test]
async fn tcp_serves_several_queries_on_one_connection() {
    with_dns_in_zone(async |dns| {
        let mut stream = TcpStream::connect(dns.tcp_addr()).await.unwrap();
        let answer = tcp_exchange(
            &mut stream,
            &query("c1.example.com.acme.example.net.", RecordType::TXT),
        )
        .await;
        assert_eq!(txt_strings(&answer), ["challenge-digest"]);
        assert_eq!(answer.answers()[0].ttl(), 1);
        let answer = tcp_exchange(
            &mut stream,
            &query("c1.example.com.acme.example.net.", RecordType::A),
        )
        .await;
        assert_eq!(answer.response_code(), ResponseCode::NotImp);
        let answer = tcp_exchange(&mut stream, &[0u8; 12][..]).await;
        assert_eq!(answer.response_code(), ResponseCode::FormErr);
    })
    .await
}

#[tokio::test]
async fn shutdown_releases_the_sockets_without_waiting_for_lookups() {
    with_timeout(async {
        let source = source();
        // A lookup that would outlast the test unless shutdown cancels it.
        let dns = start_dns(Some(ZONE), Duration::from_secs(3600), source.clone()).await;
        let (udp, tcp) = (dns.local_addr(), dns.tcp_addr());
        let _open = TcpStream::connect(tcp).await.unwrap();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket
            .send_to(
                &query("slow.example.com.acme.example.net.", RecordType::TXT),
                udp,
            )
            .await
            .unwrap();
        eventually("the lookup to start", || {
            source.hung.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
        .await;
        dns.shutdown().await;
        assert!(TcpStream::connect(tcp).await.is_err());
        // The ports are free again.
        tokio::net::UdpSocket::bind(udp).await.unwrap();
        tokio::net::TcpListener::bind(tcp).await.unwrap();
    })
    .await;
}
