//! Turns one DNS request message into its response (Plane §7.9.4), independent of the transport.
//!
//! | request | response |
//! |---|---|
//! | shorter than a DNS header, or itself a response | nothing (never answer answers) |
//! | unparseable, or not exactly one question | FORMERR |
//! | opcode other than QUERY, class other than IN, type other than TXT | NOTIMP |
//! | name that is not a challenge name ([`ChallengeNames`]) | FORMERR |
//! | source fails or does not answer within the lookup timeout | SERVFAIL |
//! | no value | NOERROR, authoritative, no answer |
//! | a value | NOERROR, authoritative, one TXT record with TTL 1 s |

use crate::challenge_name::ChallengeNames;
use crate::txt_source::TxtSource;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::sync::Arc;
use std::time::Duration;

/// TTL of answered TXT records: the value changes during an ACME order, so resolvers must not keep it.
pub const TXT_TTL_SECONDS: u32 = 1;
/// Largest UDP response without EDNS (RFC 1035 §4.2.1); larger answers are sent truncated so the
/// resolver retries over TCP. We never advertise EDNS, so this is the limit for every UDP answer.
const MAX_UDP_RESPONSE: usize = 512;
/// Size of the fixed DNS header.
const HEADER_LEN: usize = 12;
/// Longest character-string inside TXT RDATA (RFC 1035 §3.3).
const MAX_CHARACTER_STRING: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

pub(crate) struct Responder {
    names: ChallengeNames,
    source: Arc<dyn TxtSource>,
    lookup_timeout: Duration,
}

/// The outcome of looking at the request, before it is encoded.
enum Answer {
    Error(ResponseCode),
    NoValue,
    Value(Name, String),
}

impl Responder {
    pub(crate) fn new(
        names: ChallengeNames,
        source: Arc<dyn TxtSource>,
        lookup_timeout: Duration,
    ) -> Self {
        Responder {
            names,
            source,
            lookup_timeout,
        }
    }

    /// The encoded response to `packet`, or `None` when nothing must be sent back.
    pub(crate) async fn respond(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let header = RawHeader::read(packet)?;
        if header.is_response {
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(%error, "Malformed DNS request");
                return encode_error(&header, ResponseCode::FormErr);
            }
        };
        let answer = self.answer(&request).await;
        let mut response = Message::new();
        response
            .set_id(request.id())
            .set_message_type(MessageType::Response)
            .set_op_code(request.op_code())
            .set_recursion_desired(request.recursion_desired())
            .add_queries(request.queries().iter().cloned());
        match answer {
            Answer::Error(code) => {
                response.set_response_code(code);
            }
            Answer::NoValue => {
                response.set_authoritative(true);
            }
            Answer::Value(name, value) => {
                let chunks: Vec<&[u8]> = if value.is_empty() {
                    vec![b""]
                } else {
                    value.as_bytes().chunks(MAX_CHARACTER_STRING).collect()
                };
                let record =
                    Record::from_rdata(name, TXT_TTL_SECONDS, RData::TXT(TXT::from_bytes(chunks)));
                response.set_authoritative(true).add_answer(record);
            }
        }
        let encoded = match response.to_vec() {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::warn!(%error, "Could not encode a DNS response");
                return encode_error(&header, ResponseCode::ServFail);
            }
        };
        if transport == Transport::Udp && encoded.len() > MAX_UDP_RESPONSE {
            return response.truncate().to_vec().ok();
        }
        Some(encoded)
    }

    async fn answer(&self, request: &Message) -> Answer {
        if request.op_code() != OpCode::Query {
            return Answer::Error(ResponseCode::NotImp);
        }
        let [query] = request.queries() else {
            return Answer::Error(ResponseCode::FormErr);
        };
        if query.query_class() != DNSClass::IN || query.query_type() != RecordType::TXT {
            return Answer::Error(ResponseCode::NotImp);
        }
        let cluster = match name_text(query.name()).map(|text| self.names.cluster_for(&text)) {
            Some(Ok(cluster)) => cluster,
            Some(Err(mismatch)) => {
                tracing::debug!(name = %query.name(), %mismatch, "Refusing a query for a foreign name");
                return Answer::Error(ResponseCode::FormErr);
            }
            None => return Answer::Error(ResponseCode::FormErr),
        };
        match tokio::time::timeout(self.lookup_timeout, self.source.txt_record(&cluster)).await {
            Ok(Ok(Some(value))) => {
                tracing::debug!(%cluster, "Answering a TXT challenge query");
                Answer::Value(query.name().clone(), value)
            }
            Ok(Ok(None)) => {
                tracing::debug!(%cluster, "No TXT value for the cluster");
                Answer::NoValue
            }
            Ok(Err(error)) => {
                tracing::warn!(%cluster, %error, "TXT lookup failed");
                Answer::Error(ResponseCode::ServFail)
            }
            Err(_) => {
                tracing::warn!(%cluster, timeout = ?self.lookup_timeout, "TXT lookup timed out");
                Answer::Error(ResponseCode::ServFail)
            }
        }
    }
}

/// The text form of `name` (labels joined by dots, no root dot), or `None` when a label holds bytes no
/// challenge name has (this keeps escaped or binary labels away from the name mapping).
fn name_text(name: &Name) -> Option<String> {
    let mut text = String::new();
    for label in name.iter() {
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        // Checked above: every byte is ASCII.
        text.extend(label.iter().map(|b| char::from(*b)));
    }
    Some(text)
}

/// The header fields needed to answer even a request that does not parse.
struct RawHeader {
    id: u16,
    op_code: OpCode,
    is_response: bool,
    recursion_desired: bool,
}

impl RawHeader {
    fn read(packet: &[u8]) -> Option<RawHeader> {
        let header = packet.get(..HEADER_LEN)?;
        let flags = header[2];
        Some(RawHeader {
            id: u16::from_be_bytes([header[0], header[1]]),
            op_code: OpCode::from_u8((flags >> 3) & 0x0f),
            is_response: flags & 0x80 != 0,
            recursion_desired: flags & 0x01 != 0,
        })
    }
}

fn encode_error(header: &RawHeader, code: ResponseCode) -> Option<Vec<u8>> {
    let mut response = Message::error_msg(header.id, header.op_code, code);
    response.set_recursion_desired(header.recursion_desired);
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txt_source::TxtError;
    use hangar_types::ClusterName;
    use hickory_proto::op::Query;
    use rand::{Rng, SeedableRng};

    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// Answers `c1.example.com` with a fixed value, `big.example.com` with a value too large for UDP,
    /// fails for `broken.example.com`, never answers `slow.example.com`, and has no value otherwise.
    struct FixedSource;

    #[async_trait::async_trait]
    impl TxtSource for FixedSource {
        async fn txt_record(&self, cluster: &ClusterName) -> Result<Option<String>, TxtError> {
            match cluster.as_str() {
                "c1.example.com" => Ok(Some("token-value".into())),
                "big.example.com" => Ok(Some("x".repeat(600))),
                "broken.example.com" => Err(TxtError::Unavailable),
                "slow.example.com" => std::future::pending().await,
                _ => Ok(None),
            }
        }
    }

    fn responder() -> Responder {
        Responder::new(
            ChallengeNames::new(None).unwrap(),
            Arc::new(FixedSource),
            Duration::from_millis(50),
        )
    }

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        m.to_vec().unwrap()
    }

    async fn ask(packet: &[u8], transport: Transport) -> Message {
        let bytes = tokio::time::timeout(TEST_TIMEOUT, responder().respond(packet, transport))
            .await
            .unwrap()
            .expect("an answer");
        Message::from_vec(&bytes).unwrap()
    }

    #[tokio::test]
    async fn answers_value_with_ttl_and_flags() {
        let r = ask(
            &query("_acme-challenge.C1.example.com.", RecordType::TXT),
            Transport::Udp,
        )
        .await;
        assert_eq!(r.id(), 4242);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative());
        assert!(r.recursion_desired());
        assert_eq!(r.queries().len(), 1);
        let [answer] = r.answers() else {
            panic!("expected one answer: {r:?}")
        };
        assert_eq!(answer.ttl(), TXT_TTL_SECONDS);
        // The owner name is the name as asked (resolvers may randomize case).
        assert_eq!(answer.name().to_ascii(), "_acme-challenge.C1.example.com.");
        let RData::TXT(txt) = answer.data() else {
            panic!("expected TXT: {answer:?}")
        };
        assert_eq!(txt.txt_data(), [b"token-value".to_vec().into_boxed_slice()]);
    }

    #[tokio::test]
    async fn large_value_is_truncated_on_udp_and_complete_on_tcp() {
        let packet = query("_acme-challenge.big.example.com", RecordType::TXT);
        let udp = ask(&packet, Transport::Udp).await;
        assert!(udp.truncated());
        assert!(udp.answers().is_empty());
        let tcp = ask(&packet, Transport::Tcp).await;
        assert!(!tcp.truncated());
        let RData::TXT(txt) = tcp.answers()[0].data() else {
            panic!("expected TXT")
        };
        let joined: Vec<u8> = txt
            .txt_data()
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        assert_eq!(joined, vec![b'x'; 600]);
        assert_eq!(txt.txt_data().len(), 3);
    }

    #[tokio::test]
    async fn error_codes() {
        let cases = [
            (
                "_acme-challenge.other.example.com",
                RecordType::TXT,
                ResponseCode::NoError,
            ),
            ("other.example.com", RecordType::TXT, ResponseCode::FormErr),
            (
                "_acme-challenge.c1.example.com",
                RecordType::A,
                ResponseCode::NotImp,
            ),
            (
                "_acme-challenge.broken.example.com",
                RecordType::TXT,
                ResponseCode::ServFail,
            ),
            (
                "_acme-challenge.slow.example.com",
                RecordType::TXT,
                ResponseCode::ServFail,
            ),
        ];
        for (name, record_type, code) in cases {
            let r = ask(&query(name, record_type), Transport::Tcp).await;
            assert_eq!(r.response_code(), code, "{name} {record_type}");
            assert!(r.answers().is_empty(), "{name}");
            assert_eq!(r.authoritative(), code == ResponseCode::NoError, "{name}");
        }
    }

    #[tokio::test]
    async fn not_a_single_question() {
        let mut m = Message::new();
        m.set_id(7);
        let r = ask(&m.to_vec().unwrap(), Transport::Udp).await;
        assert_eq!(r.response_code(), ResponseCode::FormErr);
        let mut m = Message::new();
        let q = Query::query(
            Name::from_ascii("_acme-challenge.c1.example.com").unwrap(),
            RecordType::TXT,
        );
        m.add_query(q.clone()).add_query(q);
        let r = ask(&m.to_vec().unwrap(), Transport::Udp).await;
        assert_eq!(r.response_code(), ResponseCode::FormErr);
    }

    #[tokio::test]
    async fn other_opcode_is_notimp() {
        let mut m = Message::new();
        m.set_op_code(OpCode::Update).add_query(Query::query(
            Name::from_ascii("_acme-challenge.c1.example.com").unwrap(),
            RecordType::TXT,
        ));
        let r = ask(&m.to_vec().unwrap(), Transport::Udp).await;
        assert_eq!(r.response_code(), ResponseCode::NotImp);
    }

    #[tokio::test]
    async fn malformed_gets_formerr_with_the_request_id() {
        let mut packet = query("_acme-challenge.c1.example.com", RecordType::TXT);
        packet.truncate(packet.len() - 3);
        let r = ask(&packet, Transport::Udp).await;
        assert_eq!(r.id(), 4242);
        assert_eq!(r.response_code(), ResponseCode::FormErr);
        assert!(r.recursion_desired());
    }

    #[tokio::test]
    async fn short_packets_and_responses_get_no_answer() {
        let r = responder();
        assert_eq!(r.respond(&[], Transport::Udp).await, None);
        assert_eq!(r.respond(&[1, 2, 3], Transport::Udp).await, None);
        let mut packet = query("_acme-challenge.c1.example.com", RecordType::TXT);
        packet[2] |= 0x80; // QR: this is a response
        assert_eq!(r.respond(&packet, Transport::Udp).await, None);
    }

    /// Random bytes and randomly damaged queries never panic; every answer parses and echoes the id.
    #[tokio::test]
    async fn fuzz_never_panics() {
        let r = responder();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let valid = query("_acme-challenge.c1.example.com", RecordType::TXT);
        let run = async {
            for i in 0..10_000 {
                let packet: Vec<u8> = if i % 2 == 0 {
                    let len = rng.random_range(0..80);
                    (0..len).map(|_| rng.random()).collect()
                } else {
                    let mut p = valid.clone();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..p.len());
                        p[at] = rng.random();
                    }
                    p.truncate(rng.random_range(0..=p.len()));
                    p
                };
                if let Some(bytes) = r.respond(&packet, Transport::Udp).await {
                    let answer = Message::from_vec(&bytes).expect("our answers parse");
                    assert_eq!(answer.id(), u16::from_be_bytes([packet[0], packet[1]]));
                    assert_eq!(answer.message_type(), MessageType::Response);
                }
            }
        };
        tokio::time::timeout(TEST_TIMEOUT, run).await.unwrap();
    }
}
