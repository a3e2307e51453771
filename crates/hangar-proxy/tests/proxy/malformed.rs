//! Garbage from the network: every malformed request gets a clean 4xx (never a panic, a hang or a
//! silently dropped connection), and the proxy keeps serving afterwards.

use crate::raw::send_raw;
use crate::support::with_routed;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn malformed_requests_get_clean_4xx() {
    with_routed("b-garbage", async |env, _, token| {
        let host = env.cluster.to_string();
        let get = |target: &str, headers: &str| {
            format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n{headers}\r\n")
                .into_bytes()
        };
        let long_token = format!("/{}/x", "t".repeat(30_000));
        let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
            ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), &[400]),
            ("method only", b"GET\r\n\r\n".to_vec(), &[400]),
            (
                "invalid method",
                b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
                &[400],
            ),
            (
                "unknown version",
                b"GET /x HTTP/9.9\r\nhost: x\r\n\r\n".to_vec(),
                &[400, 505],
            ),
            ("binary garbage", (0u8..=255).rev().collect(), &[400]),
            (
                "NUL in the target",
                b"GET /a\0b HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
                &[400],
            ),
            (
                "space in a header name",
                get("/x", "bad header: y\r\n"),
                &[400],
            ),
            ("header without colon", get("/x", "nocolon\r\n"), &[400]),
            (
                "obsolete line folding",
                get("/x", "x-a: 1\r\n  folded\r\n"),
                &[400],
            ),
            (
                "control character in a value",
                get("/x", "x-a: a\x01b\r\n"),
                &[400],
            ),
            (
                "invalid content-length",
                get("/x", "content-length: abc\r\n"),
                &[400],
            ),
            (
                "conflicting content-lengths",
                get("/x", "content-length: 1\r\ncontent-length: 2\r\n"),
                &[400],
            ),
            ("invalid percent-encoding", get("/%zz%ff/x", ""), &[410]),
            (
                "percent-encoded token",
                get(&format!("/%41{token}/x"), ""),
                &[410],
            ),
            ("trailing percent", get("/tok%/x", ""), &[410]),
            (
                "non-ASCII header value",
                get("/x", "x-a: \u{ff}\u{fe}\r\n"),
                &[410],
            ),
            ("absurdly long token", get(&long_token, ""), &[410]),
            (
                "asterisk target",
                b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
                &[400],
            ),
            (
                "CONNECT",
                b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n".to_vec(),
                &[400],
            ),
            ("empty token", get("//x", ""), &[400]),
            (
                "non-UTF-8 host",
                {
                    let mut r = format!("GET /{token}/ HTTP/1.1\r\nconnection: close\r\nhost: ")
                        .into_bytes();
                    r.extend_from_slice(b"\xff\xfe\r\n\r\n");
                    r
                },
                &[400],
            ),
        ];
        for (what, request, expected) in cases {
            let response = send_raw(env.proxy.local_addr(), &request)
                .await
                .unwrap_or_else(|| panic!("{what}: connection closed without a response"));
            assert!(
                expected.contains(&response.status),
                "{what}: got {} expected {expected:?}\n{}",
                response.status,
                response.head
            );
        }

        // HTTP/2 preface followed by garbage: the connection ends, nothing else happens.
        let mut h2 = TcpStream::connect(env.proxy.local_addr()).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
            .await
            .unwrap();
        crate::raw::wait_closed(&mut h2).await;

        // The proxy still serves.
        let seen = env.echo(&format!("/{token}/still-alive")).await;
        assert_eq!(seen["path"], "/still-alive");
    })
    .await
}
