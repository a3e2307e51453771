//! `ControllerTxtSource` against a fake controller WebSocket, and `hangar dns` wired end to end.

use crate::support::*;
use hangar_client::ControllerClient;
use hangar_dns::{ControllerTxtSource, TxtError, TxtSource};
use hangar_types::{ClusterName, DnsName};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Started {
    source: Arc<ControllerTxtSource>,
    name: DnsName,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

fn start_source(controller: &FakeController) -> Started {
    let client = ControllerClient::new(controller.url().parse().unwrap()).unwrap();
    let name = DnsName::random();
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let source = ControllerTxtSource::start(client, name.clone(), cancel.clone(), &tasks);
    Started {
        source,
        name,
        cancel,
        tasks,
    }
}

impl Started {
    async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Looks up `cluster`'s TXT value, which must be `expected`.
    async fn expect_txt(&self, cluster: &ClusterName, expected: Option<&str>) {
        let expected = expected.map(str::to_string);
        assert_eq!(self.source.txt_record(cluster).await, Ok(expected));
    }
}

/// Runs `test` with [`with_timeout`] against a fake controller holding `digest-1` for
/// `c1.example.com` (passed too), answering `permits` requests before it holds the rest; shuts the
/// controller down after it.
async fn with_c1(permits: usize, test: impl AsyncFnOnce(&FakeController, ClusterName)) {
    with_timeout(async {
        let controller = FakeController::start().await;
        let c1 = cluster("c1.example.com");
        controller.set_value(&c1, "digest-1");
        controller.inner.answers.add_permits(permits);
        test(&controller, c1).await;
        controller.shutdown().await;
    })
    .await;
}

/// The answer of `hangar dns`, asking the controller at `controller_url` with `timeout`, to a TXT
/// query for `c1.example.com`'s challenge.
async fn end_to_end_answer(controller_url: &str, timeout: Duration) -> Message {
    let (config, udp, tcp) = bind(Some("acme.example.net"), timeout, controller_url).await;
    let dns = hangar_dns::start_with_controller(config, udp, tcp)
        .await
        .unwrap();
    let answer = udp_exchange(
        dns.local_addr(),
        &query("c1.example.com.acme.example.net.", RecordType::TXT),
    )
    .await;
    dns.shutdown().await;
    answer
}

#[tokio::test]
async fn handshake_and_lookup() {
    with_c1(100, async |controller, c1| {
        let started = start_source(controller);

        started.expect_txt(&c1, Some("digest-1")).await;
        started.expect_txt(&cluster("c2.example.com"), None).await;
        assert!(started.source.is_connected());
        let hellos = controller.inner.hellos.lock().unwrap().clone();
        assert_eq!(hellos.len(), 1);
        assert_eq!(hellos[0].name, started.name);
        assert_eq!(hellos[0].protocol, hangar_types::PROTOCOL_VERSION);
        assert_eq!(started.source.waiting_lookups(), 0);

        started.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn concurrent_lookups_share_one_request() {
    with_c1(0, async |controller, c1| {
        let c2 = cluster("c2.example.com");
        let started = start_source(controller);
        let spawn_lookup = |cluster: &hangar_types::ClusterName| {
            let (source, cluster) = (started.source.clone(), cluster.clone());
            tokio::spawn(async move { source.txt_record(&cluster).await })
        };

        // One lookup whose request has reached the controller, then nine more while it is in flight.
        let mut lookups = vec![spawn_lookup(&c1)];
        eventually("the first request", || {
            controller.inner.requests_for(&c1) == 1
        })
        .await;
        lookups.extend((0..9).map(|_| spawn_lookup(&c1)));
        eventually("10 waiting lookups", || {
            started.source.waiting_lookups() == 10
        })
        .await;
        // Requests arrive in order: once c2's is read, any duplicate for c1 would have been too.
        let other = spawn_lookup(&c2);
        eventually("the request for c2", || {
            controller.inner.requests_for(&c2) == 1
        })
        .await;
        assert_eq!(controller.inner.requests_for(&c1), 1);

        controller.inner.answers.add_permits(2);
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap(), Ok(Some("digest-1".to_string())));
        }
        assert_eq!(other.await.unwrap(), Ok(None));
        assert_eq!(started.source.waiting_lookups(), 0);

        // Nothing is cached: the next lookup asks again and sees the new value.
        controller.set_value(&c1, "digest-2");
        controller.inner.answers.add_permits(1);
        started.expect_txt(&c1, Some("digest-2")).await;
        assert_eq!(controller.inner.requests_for(&c1), 2);

        started.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unanswered_request_is_resent_after_reconnect() {
    with_c1(100, async |controller, c1| {
        controller
            .inner
            .drop_next_request
            .store(true, Ordering::SeqCst);
        let started = start_source(controller);

        started.expect_txt(&c1, Some("digest-1")).await;
        assert_eq!(controller.inner.requests_for(&c1), 2);
        assert_eq!(controller.inner.hellos.lock().unwrap().len(), 2);

        started.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn abandoned_lookup_is_forgotten_and_shutdown_fails_lookups() {
    with_c1(0, async |controller, c1| {
        let started = start_source(controller);

        // The controller holds its answer; the lookup is given up once its request is out.
        tokio::select! {
            result = started.source.txt_record(&c1) => panic!("unexpected answer {result:?}"),
            () = eventually("the request", || controller.inner.requests_for(&c1) == 1) => {}
        }
        assert_eq!(started.source.waiting_lookups(), 0);
        // Nobody waits for that request any more, so a new lookup sends its own.
        let source = started.source.clone();
        let again = tokio::spawn({
            let c1 = c1.clone();
            async move { source.txt_record(&c1).await }
        });
        eventually("a second request", || {
            controller.inner.requests_for(&c1) == 2
        })
        .await;
        controller.inner.answers.add_permits(2);
        assert_eq!(again.await.unwrap(), Ok(Some("digest-1".to_string())));

        // Shutdown fails waiting and later lookups. (Another cluster: the answer to the second request
        // for c1 may still be on its way and would resolve a new c1 lookup.)
        let source = started.source.clone();
        let waiting =
            tokio::spawn(async move { source.txt_record(&cluster("c2.example.com")).await });
        eventually("a waiting lookup", || started.source.waiting_lookups() == 1).await;
        let source = started.source.clone();
        started.shutdown().await;
        assert_eq!(waiting.await.unwrap(), Err(TxtError::Closed));
        assert_eq!(source.txt_record(&c1).await, Err(TxtError::Closed));
    })
    .await
}

#[tokio::test]
async fn dns_answers_from_the_controller_end_to_end() {
    with_timeout(async {
        let controller = FakeController::start().await;
        controller.set_value(&cluster("c1.example.com"), "digest-e2e");
        controller.inner.answers.add_permits(100);
        let answer = end_to_end_answer(&controller.url(), Duration::from_secs(5)).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert_eq!(answer.answers().len(), 1);
        assert_eq!(answer.answers()[0].ttl(), 1);
        controller.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unreachable_controller_gives_servfail() {
    with_timeout(async {
        // Nothing listens on this port once the listener is dropped.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/");
        let answer = end_to_end_answer(&url, Duration::from_millis(200)).await;
        assert_eq!(answer.response_code(), ResponseCode::ServFail);
    })
    .await;
}
