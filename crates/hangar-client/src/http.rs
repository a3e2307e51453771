//! HTTP client of the controller API. The base URL may carry a bearer token as its username
//! (`http://TOKEN@host:8080/`), as Plane's client accepts.

use hangar_types::api::{
    ApiError, BackendDetails, BackendList, ClusterState, ConnectRequest, ConnectResponse,
    DrainResult, HealthResponse, MarkLostResult, RevokeRequest, StatusResponse,
    TerminationCandidates,
};
use hangar_types::state::BackendStatusEntry;
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig, WarmPoolList};
use hangar_types::{BackendId, ClusterName, DroneName, WarmPoolName};
use serde::de::DeserializeOwned;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller answered {status}: {error}")]
    Api {
        status: reqwest::StatusCode,
        error: ApiError,
    },
    #[error("controller answered {status}: {body}")]
    UnexpectedResponse {
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("could not reach the controller: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("invalid controller URL: {0}")]
    InvalidUrl(String),
    #[error("WebSocket error: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("handshake failed: {0}")]
    Handshake(String),
}

impl ClientError {
    /// Whether retrying later may succeed (transport failures and 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Api { status, .. } | ClientError::UnexpectedResponse { status, .. } => {
                status.is_server_error()
            }
            ClientError::Transport(_) | ClientError::WebSocket(_) => true,
            ClientError::InvalidUrl(_) | ClientError::Handshake(_) => false,
        }
    }

    /// Whether the controller did not answer within the client's request timeout
    /// ([`ControllerClient::with_request_timeout`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Transport(e) if e.is_timeout())
    }
}

/// A controller API client. Clones share its connections.
///
/// Request-response calls and streams (status streams, `/ctrl/events`, logs) have separate
/// connection pools. A stream given up before its end takes its HTTP/1.1 connection with it (the
/// connection cannot carry another request while the response runs on), so on a shared pool a
/// call right after a stream (a `connect`, then its status stream until `ready`, then the next
/// `connect`) would have to open a new connection each time. With their own pool, calls keep
/// their kept-alive connections.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    base: Url,
    bearer: Option<String>,
    http: reqwest::Client,
    /// Made on the first stream.
    streams: Arc<OnceLock<reqwest::Client>>,
    /// Limit of each request-response call (not of streams); none when `None`.
    request_timeout: Option<Duration>,
}

impl ControllerClient {
    /// `base` is the controller's URL (`http(s)://[token@]host:port/`).
    pub fn new(mut base: Url) -> Result<Self, ClientError> {
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::InvalidUrl(format!(
                "{base}: scheme must be http or https"
            )));
        }
        let bearer = (!base.username().is_empty()).then(|| base.username().to_string());
        base.set_username("")
            .map_err(|_| ClientError::InvalidUrl(base.to_string()))?;
        base.set_password(None)
            .map_err(|_| ClientError::InvalidUrl(base.to_string()))?;
        Ok(ControllerClient {
            base,
            bearer,
            http: reqwest::Client::new(),
            streams: Arc::default(),
            request_timeout: None,
        })
    }

    /// Fails each request-response call that has not been answered within `timeout` (connecting
    /// included) with a transport error for which [`ClientError::is_timeout`] holds. Streams (the
    /// status stream, events) are not limited: they last as long as the caller wants.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Uses `token` as the bearer token (overrides one in the URL).
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        if token.is_some() {
            self.bearer = token;
        }
        self
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn bearer(&self) -> Option<&str> {
        self.bearer.as_deref()
    }

    pub(crate) fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path)
            .map_err(|e| ClientError::InvalidUrl(e.to_string()))
    }

    pub(crate) fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        self.request_on(&self.http, method, path)
    }

    /// [`Self::request`] on the streams' connection pool, for a response read as a stream.
    pub(crate) fn stream_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let streams = self.streams.get_or_init(reqwest::Client::new);
        self.request_on(streams, method, path)
    }

    /// A request to `path` through `pool`, with the bearer token when there is one.
    fn request_on(
        &self,
        pool: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let req = pool.request(method, self.url(path)?);
        Ok(match &self.bearer {
            Some(b) => req.bearer_auth(b),
            None => req,
        })
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let body = resp.text().await?;
        if status.is_success() {
            return serde_json::from_str(&body).map_err(|e| ClientError::UnexpectedResponse {
                status,
                body: format!("{e}: {body}"),
            });
        }
        match serde_json::from_str::<ApiError>(&body) {
            Ok(error) => Err(ClientError::Api { status, error }),
            Err(_) => Err(ClientError::UnexpectedResponse { status, body }),
        }
    }

    /// [`Self::request`] for a request-response call, limited by the request timeout.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let req = self.request(method, path)?;
        Ok(match self.request_timeout {
            Some(timeout) => req.timeout(timeout),
            None => req,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.call(reqwest::Method::GET, path)?.send().await?;
        Self::decode(resp).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self
            .call(reqwest::Method::POST, path)?
            .json(body)
            .send()
            .await?;
        Self::decode(resp).await
    }

    pub async fn connect(&self, req: &ConnectRequest) -> Result<ConnectResponse, ClientError> {
        self.post("/ctrl/connect", req).await
    }

    /// Creates or changes a warm pool (`PUT /ctrl/warm-pools/{name}`).
    pub async fn put_warm_pool(
        &self,
        name: &WarmPoolName,
        config: &WarmPoolConfig,
    ) -> Result<WarmPool, ClientError> {
        let path = format!("/ctrl/warm-pools/{name}");
        let resp = self
            .request(reqwest::Method::PUT, &path)?
            .json(config)
            .send()
            .await?;
        Self::decode(resp).await
    }

    /// Every warm pool with its counts (`GET /ctrl/warm-pools`).
    pub async fn warm_pools(&self) -> Result<WarmPoolList, ClientError> {
        self.get("/ctrl/warm-pools").await
    }

    /// Deletes a warm pool; answers with it as it was (`DELETE /ctrl/warm-pools/{name}`).
    pub async fn delete_warm_pool(&self, name: &WarmPoolName) -> Result<WarmPool, ClientError> {
        let path = format!("/ctrl/warm-pools/{name}");
        let resp = self.request(reqwest::Method::DELETE, &path)?.send().await?;
        Self::decode(resp).await
    }

    pub async fn soft_terminate(&self, backend: &BackendId) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post(&format!("/ctrl/b/{backend}/soft-terminate"), &())
            .await?;
        Ok(())
    }

    pub async fn hard_terminate(&self, backend: &BackendId) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post(&format!("/ctrl/b/{backend}/hard-terminate"), &())
            .await?;
        Ok(())
    }

    pub async fn revoke(&self, req: &RevokeRequest) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/ctrl/b/revoke", req).await?;
        Ok(())
    }

    pub async fn drain(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Result<DrainResult, ClientError> {
        self.post(&format!("/ctrl/c/{cluster}/d/{drone}/drain"), &())
            .await
    }

    /// Records every backend of the drone that is not terminated as terminated with reason `lost`,
    /// releasing their keys at once (an operator's decision that the drone is gone).
    pub async fn mark_lost(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Result<MarkLostResult, ClientError> {
        self.post(&format!("/ctrl/c/{cluster}/d/{drone}/mark-lost"), &())
            .await
    }

    /// Forbids further renewals of the backend's key lease, so its drone terminates it by its key
    /// deadlines and the key expires.
    pub async fn prevent_renew(&self, backend: &BackendId) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post(&format!("/ctrl/b/{backend}/prevent-renew"), &())
            .await?;
        Ok(())
    }

    pub async fn backend_status(
        &self,
        backend: &BackendId,
    ) -> Result<BackendStatusEntry, ClientError> {
        self.get(&format!("/pub/b/{backend}/status")).await
    }

    /// Backends matching the filters, newest first (`GET /ctrl/backends`); `query` holds the
    /// `status`, `cluster`, `key`, `namespace` and `limit` parameters that are given.
    pub async fn list_backends(
        &self,
        query: &[(&str, String)],
    ) -> Result<BackendList, ClientError> {
        let mut path = String::from("/ctrl/backends");
        if !query.is_empty() {
            let encoded = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            path.push('?');
            path.push_str(&encoded);
        }
        self.get(&path).await
    }

    /// A backend with its key, drone and status history (`GET /ctrl/b/{backend}`).
    pub async fn backend_details(
        &self,
        backend: &BackendId,
    ) -> Result<BackendDetails, ClientError> {
        self.get(&format!("/ctrl/b/{backend}")).await
    }

    pub async fn cluster_state(&self, cluster: &ClusterName) -> Result<ClusterState, ClientError> {
        self.get(&format!("/ctrl/c/{cluster}/state")).await
    }

    /// The cluster's state including the nodes no controller holds now (`controller: None`).
    pub async fn cluster_state_with_detached(
        &self,
        cluster: &ClusterName,
    ) -> Result<ClusterState, ClientError> {
        self.get(&format!("/ctrl/c/{cluster}/state?all=true")).await
    }

    /// The backends the sweeper would terminate now on a drone, and why.
    pub async fn termination_candidates(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Result<TerminationCandidates, ClientError> {
        self.get(&format!(
            "/ctrl/c/{cluster}/d/{drone}/termination-candidates"
        ))
        .await
    }

    /// Every cluster with a node attached to some controller, with its drones and proxies (from the
    /// dashboard's snapshot, asking for as few backends as it allows).
    pub async fn clusters(&self) -> Result<Vec<(ClusterName, ClusterState)>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Snapshot {
            clusters: Vec<Cluster>,
        }
        #[derive(serde::Deserialize)]
        struct Cluster {
            name: ClusterName,
            #[serde(flatten)]
            state: ClusterState,
        }
        let snapshot: Snapshot = self.get("/ctrl/dashboard/state?limit=1").await?;
        Ok(snapshot
            .clusters
            .into_iter()
            .map(|c| (c.name, c.state))
            .collect())
    }

    /// Opens `GET /ctrl/events` (Server-Sent Events of [`hangar_types::api::BusEvent`]s); the caller
    /// reads the body as a stream.
    pub async fn events(&self) -> Result<reqwest::Response, ClientError> {
        let request = self
            .stream_request(reqwest::Method::GET, "/ctrl/events")?
            .header(reqwest::header::ACCEPT, "text/event-stream");
        Self::open_stream(request).await
    }

    /// Sends `request` and returns the response to read as a stream, or the API error.
    async fn open_stream(
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = request.send().await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(Self::decode::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or(ClientError::Handshake("unexpected success".into())))
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.get("/ctrl/status").await
    }

    /// Opens `GET /ctrl/b/{backend}/logs` (JSON lines of [`hangar_types::logs::LogLine`]); the
    /// caller reads the body as a stream. `since`: milliseconds since the epoch or a duration such as
    /// `10m`.
    pub async fn backend_logs(
        &self,
        backend: &BackendId,
        since: Option<&str>,
        tail: Option<u32>,
        follow: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let mut query = vec![("follow", follow.to_string())];
        if let Some(since) = since {
            query.push(("since", since.to_string()));
        }
        if let Some(tail) = tail {
            query.push(("tail", tail.to_string()));
        }
        let request = self
            .stream_request(reqwest::Method::GET, &format!("/ctrl/b/{backend}/logs"))?
            .query(&query);
        Self::open_stream(request).await
    }

    /// `GET /ctrl/b/{backend}/events`: the backend's state history and, when it failed, its last
    /// stderr lines.
    pub async fn backend_events(
        &self,
        backend: &BackendId,
    ) -> Result<hangar_types::logs::BackendEvents, ClientError> {
        self.get(&format!("/ctrl/b/{backend}/events")).await
    }

    pub async fn health(&self) -> Result<HealthResponse, ClientError> {
        self.get("/pub/health").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_from_url_username() {
        let c = ControllerClient::new("http://sekrit@localhost:8080/".parse().unwrap()).unwrap();
        assert_eq!(c.bearer(), Some("sekrit"));
        assert_eq!(c.base().as_str(), "http://localhost:8080/");
        assert_eq!(
            c.url("/ctrl/status").unwrap().as_str(),
            "http://localhost:8080/ctrl/status"
        );
        assert!(ControllerClient::new("ftp://x/".parse().unwrap()).is_err());
    }

    /// A loopback server answering `/pub/health` and an endless status stream (one `ready` event,
    /// then nothing), that records the client port of each request it answers.
    async fn recording_server() -> (Url, Arc<std::sync::Mutex<Vec<(String, u16)>>>) {
        use bytes::Bytes;
        use futures_util::StreamExt;
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let recorded = recorded.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let path = req.uri().path().to_string();
                    recorded.lock().unwrap().push((path.clone(), peer.port()));
                    async move {
                        let event: Bytes = if path.ends_with("/status-stream") {
                            "data: {\"status\":\"ready\",\"time\":1}\n\n".into()
                        } else {
                            r#"{"status":"ok"}"#.into()
                        };
                        type Frames = futures_util::stream::BoxStream<
                            'static,
                            Result<Frame<Bytes>, std::convert::Infallible>,
                        >;
                        let rest: Frames = if path.ends_with("/status-stream") {
                            futures_util::stream::pending().boxed()
                        } else {
                            futures_util::stream::empty().boxed()
                        };
                        let frames = futures_util::stream::once(async { Ok(Frame::data(event)) })
                            .chain(rest);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                            frames,
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (url.parse().unwrap(), seen)
    }

    #[tokio::test]
    async fn a_stream_given_up_does_not_cost_the_next_call_its_connection() {
        let (url, seen) = recording_server().await;
        let client = ControllerClient::new(url).unwrap();
        let backend: BackendId = "b1".parse().unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            client.health().await.unwrap();
            let mut stream =
                crate::status_stream::StatusStream::new(client.clone(), backend.clone());
            let entry = stream.next().await.unwrap();
            assert_eq!(entry.status, hangar_types::BackendStatus::Ready);
            // Given up before the stream's end, as a caller waiting for `ready` does.
            drop(stream);
            client.health().await.unwrap();
        })
        .await
        .expect("test timed out");
        let seen = seen.lock().unwrap().clone();
        let ports: Vec<u16> = seen.iter().map(|(_, port)| *port).collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(
            ports[0], ports[2],
            "the second call opened a new connection: {seen:?}"
        );
        assert_ne!(
            ports[0], ports[1],
            "the stream took the calls' connection: {seen:?}"
        );
    }
}
