//! Test helpers: a fake [`TxtSource`], a fake controller serving `/ctrl/dns-socket`, DNS queries over
//! UDP and TCP, and polling with a deadline.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::routing::get;
use hangar_dns::{DnsConfig, DnsHandle, TxtError, TxtSource};
use hangar_test_support::handshake::welcome;
use hangar_test_support::served::Served;
use hangar_types::protocol::{ControllerToDns, DnsHello, DnsToController};
use hangar_types::ClusterName;
use hickory_proto::op::{Message as DnsMessage, Query};
use hickory_proto::rr::{Name, RecordType};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Upper bound for every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `test` with [`TEST_TIMEOUT`].
pub async fn with_timeout<F: std::future::Future>(test: F) -> F::Output {
    hangar_test_support::with_timeout(TEST_TIMEOUT, test).await
}

/// How long [`eventually`] polls: shorter than [`TEST_TIMEOUT`] so its message is the one reported.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `check` until it holds; panics after [`EVENTUALLY_TIMEOUT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    hangar_test_support::eventually_within(EVENTUALLY_TIMEOUT, what, || {
        let done = check();
        async move { done.then_some(()) }
    })
    .await;
}

pub fn cluster(s: &str) -> ClusterName {
    s.parse().unwrap()
}

/// Fixed values; clusters in `hanging` never answer.
#[derive(Default)]
pub struct FakeSource {
    pub values: HashMap<ClusterName, String>,
    pub hanging: Vec<ClusterName>,
    /// Lookups that started hanging.
    pub hung: AtomicUsize,
}

#[async_trait::async_trait]
impl TxtSource for FakeSource {
    async fn txt_record(&self, cluster: &ClusterName) -> Result<Option<String>, TxtError> {
        if self.hanging.contains(cluster) {
            self.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        Ok(self.values.get(cluster).cloned())
    }
}

/// Binds UDP and TCP on 127.0.0.1 (port 0) and starts the responder with `source`.
pub async fn start_dns(
    zone: Option<&str>,
    lookup_timeout: Duration,
    source: Arc<dyn TxtSource>,
) -> DnsHandle {
    let (config, udp, tcp) = bind(zone, lookup_timeout, "http://127.0.0.1:1/").await;
    hangar_dns::start(config, source, udp, tcp).await.unwrap()
}

pub async fn bind(
    zone: Option<&str>,
    lookup_timeout: Duration,
    controller_url: &str,
) -> (DnsConfig, UdpSocket, TcpListener) {
    let mut config = DnsConfig::new(controller_url.parse().unwrap(), zone.map(String::from));
    config.lookup_timeout = lookup_timeout;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    (config, udp, tcp)
}

pub fn query(name: &str, record_type: RecordType) -> Vec<u8> {
    let mut m = DnsMessage::new();
    m.set_id(rand::random())
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    m.to_vec().unwrap()
}

/// Sends `packet` over UDP and returns the answer, checking it carries the request's id.
pub async fn udp_exchange(server: SocketAddr, packet: &[u8]) -> DnsMessage {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (len, from) = socket.recv_from(&mut buf).await.unwrap();
    assert_eq!(from, server);
    let answer = DnsMessage::from_vec(&buf[..len]).unwrap();
    assert_eq!(answer.id(), u16::from_be_bytes([packet[0], packet[1]]));
    answer
}

/// Sends length-prefixed `packet` on `stream` and reads one length-prefixed answer.
pub async fn tcp_exchange(stream: &mut TcpStream, packet: &[u8]) -> DnsMessage {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    let answer = DnsMessage::from_vec(&buf).unwrap();
    assert_eq!(answer.id(), u16::from_be_bytes([packet[0], packet[1]]));
    answer
}

/// A controller that serves only `/ctrl/dns-socket`.
pub struct FakeController {
    pub addr: SocketAddr,
    pub inner: Arc<ControllerInner>,
    served: Served,
}

pub struct ControllerInner {
    /// TXT values by cluster.
    pub values: Mutex<HashMap<ClusterName, String>>,
    /// Every request received, in order.
    pub requests: Mutex<Vec<ClusterName>>,
    /// Handshakes received, in order.
    pub hellos: Mutex<Vec<DnsHello>>,
    /// One permit per answer the controller may send; a request without a permit waits.
    pub answers: Semaphore,
    /// When set, the next request is not answered: the controller drops the connection instead.
    pub drop_next_request: AtomicBool,
}

impl ControllerInner {
    pub fn requests_for(&self, cluster: &ClusterName) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == cluster)
            .count()
    }
}

impl FakeController {
    pub async fn start() -> FakeController {
        let inner = Arc::new(ControllerInner {
            values: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            hellos: Mutex::new(Vec::new()),
            answers: Semaphore::new(0),
            drop_next_request: AtomicBool::new(false),
        });
        let app = axum::Router::new()
            .route(
                "/ctrl/dns-socket",
                get(
                    |ws: WebSocketUpgrade, State(inner): State<Arc<ControllerInner>>| async move {
                        ws.on_upgrade(move |socket| run_fake_session(inner, socket))
                    },
                ),
            )
            .with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        FakeController {
            addr,
            inner,
            served: Served::start(listener, app),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn set_value(&self, cluster: &ClusterName, value: &str) {
        self.inner
            .values
            .lock()
            .unwrap()
            .insert(cluster.clone(), value.to_string());
    }

    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

async fn run_fake_session(inner: Arc<ControllerInner>, mut socket: WebSocket) {
    if !welcome(&mut socket, &inner.hellos).await {
        return;
    }
    // Requests are read (and counted) as they arrive; answers go out in order, one per permit.
    let mut unanswered = VecDeque::new();
    loop {
        tokio::select! {
            message = socket.recv() => {
                let Some(Ok(message)) = message else { return };
                let Message::Text(text) = message else { continue };
                let DnsToController::TxtRecordRequest { cluster } =
                    serde_json::from_str(text.as_str()).expect("a DnsToController");
                inner.requests.lock().unwrap().push(cluster.clone());
                if inner.drop_next_request.swap(false, Ordering::SeqCst) {
                    return;
                }
                unanswered.push_back(cluster);
            }
            permit = inner.answers.acquire(), if !unanswered.is_empty() => {
                let Ok(permit) = permit else { return };
                permit.forget();
                let Some(cluster) = unanswered.pop_front() else { continue };
                let txt_value = inner.values.lock().unwrap().get(&cluster).cloned();
                let answer = serde_json::to_string(&ControllerToDns::TxtRecordResponse {
                    cluster,
                    txt_value,
                })
                .unwrap();
                if socket.send(Message::Text(answer.into())).await.is_err() {
                    return;
                }
            }
        }
    }
}
