//! Messages on the WebSocket sessions between nodes (drones, proxies) and the controller. Every frame is
//! one JSON text message. A session starts with the node's [`Hello`] and the controller's
//! [`HelloResponse`]; afterwards each side sends its direction's enum. Delivery guarantees are built on
//! top with explicit acks: actions are resent until the drone sends `AckAction`, drone events are kept
//! in the drone's outbox until the controller sends `AckEvent`.

use crate::api::KeyConfig;
use crate::executable::{Executable, ExecutorKind};
use crate::logs::{LogEndReason, LogLine, LogSince};
use crate::names::{
    ActionId, BackendId, ClusterName, ControllerName, DnsName, DroneName, ProxyName,
};
use crate::state::{BackendState, TerminationKind, TerminationReason};
use crate::time::Millis;
use crate::token::{ConnectionToken, SecretToken};
use crate::warm_pool::ClaimHook;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// First frame a node sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the node.
    pub protocol: u32,
    /// Hangar version of the node (informational).
    pub version: String,
    pub node: NodeHello,
}

impl Hello {
    /// This build's hello for `node`: [`crate::PROTOCOL_VERSION`] and [`crate::VERSION`].
    pub fn new(node: NodeHello) -> Self {
        Hello {
            protocol: crate::PROTOCOL_VERSION,
            version: crate::VERSION.to_string(),
            node,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeHello {
    Drone {
        name: DroneName,
        pool: String,
        executors: Vec<ExecutorKind>,
    },
    Proxy {
        name: ProxyName,
    },
}

/// The controller's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloResponse {
    Welcome {
        protocol: u32,
        version: String,
        controller: ControllerName,
    },
    /// The session is refused (protocol mismatch, bad name, duplicate live drone…); the controller closes
    /// the socket after sending this.
    Refused { reason: String },
}

impl HelloResponse {
    /// This build's welcome from `controller`: [`crate::PROTOCOL_VERSION`] and [`crate::VERSION`].
    pub fn welcome(controller: ControllerName) -> Self {
        HelloResponse::Welcome {
            protocol: crate::PROTOCOL_VERSION,
            version: crate::VERSION.to_string(),
            controller,
        }
    }
}

/// Deadlines on the **drone's** clock for one key lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDeadlines {
    pub renew_at: Millis,
    pub soft_terminate_at: Millis,
    pub hard_terminate_at: Millis,
}

impl KeyDeadlines {
    /// Deadlines counted from a drone-local time `base`.
    pub fn from_base(base: Millis) -> Self {
        KeyDeadlines::from_base_with(base, &crate::timing::KeyTiming::DEFAULT)
    }

    /// Deadlines counted from a drone-local time `base` with the given durations.
    pub fn from_base_with(base: Millis, timing: &crate::timing::KeyTiming) -> Self {
        KeyDeadlines {
            renew_at: base.plus(timing.renew_after),
            soft_terminate_at: base.plus(timing.soft_terminate_after),
            hard_terminate_at: base.plus(timing.hard_terminate_after),
        }
    }
}

/// A key lease as handed to the drone with a spawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquiredKey {
    pub key: KeyConfig,
    pub deadlines: KeyDeadlines,
    /// Fencing token: strictly increases across acquisitions of the same key.
    pub token: i64,
}

// Wire messages are short-lived and moved once; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BackendAction {
    Spawn {
        executable: Executable,
        key: AcquiredKey,
        static_token: Option<ConnectionToken>,
    },
    Terminate {
        kind: TerminationKind,
        reason: TerminationReason,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionMessage {
    pub action_id: ActionId,
    pub backend_id: BackendId,
    pub action: BackendAction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DroneToController {
    /// Sent on connect and every [`crate::timing::HEARTBEAT_INTERVAL`].
    Heartbeat {
        local_time: Millis,
    },
    /// A state change from the drone's outbox; resent until acked.
    BackendEvent {
        event_id: i64,
        backend_id: BackendId,
        state: BackendState,
        timestamp: Millis,
    },
    AckAction {
        action_id: ActionId,
    },
    RenewKey {
        backend: BackendId,
        local_time: Millis,
    },
    /// One resource sample of a running backend (Docker stats), at most one per backend every
    /// `BACKEND_METRICS_INTERVAL`. Best effort: never stored in the outbox, dropped while disconnected.
    /// CPU figures cover the time since the backend's previous sample (both 0 in its first sample):
    /// `cpu_used_ns / sys_cpu_ns × online CPUs` is its CPU share.
    BackendMetrics {
        backend_id: BackendId,
        /// Memory in use, bytes, page cache that can be dropped (`inactive_file`) excluded.
        mem_used: u64,
        /// Memory limit, bytes (the host's memory when the backend has no limit).
        mem_limit: u64,
        /// CPU time the backend used, nanoseconds.
        cpu_used_ns: u64,
        /// CPU time the whole host used, nanoseconds.
        sys_cpu_ns: u64,
    },
    /// Hangar extension: the drone's executor cannot run backends (`error`), or can again (`None`).
    /// Sent on every connection while there is an error, and on every change. Shown in cluster state.
    ExecutorStatus {
        error: Option<String>,
    },
    /// Hangar extension: kept output lines for [`ControllerToDrone::LogRequest`] `request_id`, oldest
    /// first. Flow-controlled: at most [`LOG_WINDOW`] batches are unanswered by a `LogCredit`.
    LogLines {
        request_id: u64,
        lines: Vec<LogLine>,
    },
    /// Hangar extension: the log read `request_id` is over (nothing follows).
    LogEnd {
        request_id: u64,
        reason: LogEndReason,
    },
    /// Hangar extension: the answer to [`ControllerToDrone::ClaimHook`] `request_id`.
    ClaimHookResult {
        request_id: u64,
        outcome: ClaimHookOutcome,
    },
}

/// How a claim hook ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClaimHookOutcome {
    /// The backend answered 2xx: the claim is complete.
    Accepted,
    /// The backend answered otherwise, not in time, or not at all (`message` says which). The drone
    /// hard-terminated it before answering; `terminated` is its final state once the drone recorded
    /// it (`None` when the drone does not run the backend or could not confirm its end).
    Refused {
        message: String,
        terminated: Option<BackendState>,
    },
}

/// Batches of [`DroneToController::LogLines`] a drone may send for one log read before the
/// controller grants more with [`ControllerToDrone::LogCredit`].
pub const LOG_WINDOW: u32 = 4;

#[allow(clippy::large_enum_variant)] // see BackendAction
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerToDrone {
    Action(ActionMessage),
    AckEvent {
        event_id: i64,
    },
    /// `deadlines: None` means the renewal was refused: the drone must let the backend run into its
    /// current deadlines.
    RenewKeyResponse {
        backend: BackendId,
        deadlines: Option<KeyDeadlines>,
    },
    /// Hangar extension: send the kept output lines of `backend` (those since `since`, only the last
    /// `tail` of them), then with `follow` every new line until the backend ends. Answered with
    /// `LogLines` batches and one `LogEnd`. `request_id` is chosen by the controller, unique per session.
    /// A followed read always begins with a batch once the drone is watching (empty when nothing is
    /// kept yet), so the controller knows no later line can be missed.
    LogRequest {
        request_id: u64,
        backend: BackendId,
        since: Option<LogSince>,
        tail: Option<u32>,
        follow: bool,
    },
    /// Hangar extension: the controller consumed one `LogLines` batch of `request_id`: one more may
    /// be sent.
    LogCredit {
        request_id: u64,
    },
    /// Hangar extension: the reader of `request_id` went away: stop sending (no `LogEnd` needed).
    LogCancel {
        request_id: u64,
    },
    /// Hangar extension: `POST` `body` as JSON to `path` of the ready `backend` (a warm backend just
    /// claimed) within [`crate::timing::CLAIM_HOOK_TIMEOUT`]; answered with one `ClaimHookResult`.
    /// Anything but a 2xx answer in time hard-terminates the backend before the answer is sent.
    ClaimHook {
        request_id: u64,
        backend: BackendId,
        path: String,
        body: ClaimHook,
    },
}

/// Everything the proxy needs to forward a request for one token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub backend_id: BackendId,
    pub address: SocketAddr,
    /// Empty for static tokens.
    pub secret_token: SecretToken,
    pub cluster: ClusterName,
    pub user: Option<String>,
    /// The token's `auth` object; `None` for static tokens.
    pub user_data: Option<serde_json::Map<String, serde_json::Value>>,
    pub subdomain: Option<String>,
    /// How long the backend's key lease still ran when the controller resolved the token, in
    /// milliseconds (a remaining time, not an instant: clocks differ). The proxy uses the route only
    /// until this long after it *sent* the request, unless [`ControllerToProxy::KeyLease`] extends it,
    /// so a proxy cut off from every controller stops routing to a backend before its key can go to
    /// another backend. `None`: the backend holds no key (an unclaimed warm backend), or a controller
    /// that predates the field answered; the route is then unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_remaining_ms: Option<u64>,
}

impl RouteInfo {
    /// [`RouteInfo::lease_remaining_ms`] as a duration.
    pub fn lease_remaining(&self) -> Option<std::time::Duration> {
        self.lease_remaining_ms
            .map(std::time::Duration::from_millis)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyToController {
    /// Resolve a token. The controller answers once the backend is ready, or at once with `None` when
    /// the token is unknown or its backend is terminating/terminated.
    RouteRequest { token: ConnectionToken },
    /// The backend had traffic (sent on first activity, then every heartbeat interval while active).
    /// Answered with [`ControllerToProxy::KeyLease`] while the backend holds a key, with
    /// `BackendRemoved` once it is terminated.
    /// `connected`: this proxy has open connections to the backend right now; the controller does not
    /// count a backend as idle while a proxy's connected report is younger than
    /// [`crate::timing::CONNECTED_REPORT_TTL`]. The proxy sends `connected: false` as soon as its last
    /// connection to the backend closes, so the idle clock starts exactly then.
    KeepAlive {
        backend: BackendId,
        #[serde(default)]
        connected: bool,
    },

    // ---- TLS: cluster certificate via ACME (plane-api.md §7.9.3). Only one proxy of a cluster runs an
    // ACME order at a time: the holder of the cluster's certificate lease. ----
    /// Asks for the cluster's certificate lease, or renews it when this proxy already holds it. The
    /// lease lasts [`crate::timing::CERT_LEASE`] on the store clock; the holder renews by asking again
    /// before it runs out (a long ACME order should renew every ~30 s). Answered with
    /// [`ControllerToProxy::CertLeaseResponse`] (`accepted: false` when another proxy holds an unexpired
    /// lease, or on a store error).
    CertLeaseRequest,
    /// Gives the lease up (only if this proxy holds it), e.g. once the certificate is stored; its TXT
    /// value goes with it. No answer.
    ReleaseCertLease,
    /// Sets (`Some`) or clears (`None`) the cluster's ACME DNS-01 TXT value, which the DNS responders
    /// serve for `_acme-challenge.<cluster>`. Only the lease holder may set it. Answered with
    /// [`ControllerToProxy::SetTxtRecordResponse`].
    SetTxtRecord { txt_value: Option<String> },
    /// Publishes (`Some`) or withdraws (`None`) an ACME HTTP-01 challenge answer
    /// (`/.well-known/acme-challenge/<token>` → `key_authorization`). Only the lease holder may set
    /// one; the controller pushes it to every proxy of the cluster as
    /// [`ControllerToProxy::HttpChallenge`], so whichever proxy the ACME server reaches can answer.
    /// `token` is at most 256 characters of base64url, `key_authorization` at most 512 of base64url and
    /// `.`; anything else is refused (logged, not forwarded). No answer.
    SetHttpChallenge {
        token: String,
        key_authorization: Option<String>,
    },
    /// Stores a freshly issued certificate for the cluster (PEM chain and PEM private key, each at most
    /// 64 KiB); the controller pushes it to every proxy of the cluster as
    /// [`ControllerToProxy::Certificate`] and sends it to proxies that connect later. Any proxy of the
    /// cluster may store one (the newest wins). Holds a private key: never log this message. No answer.
    StoreCertificate { cert_pem: String, key_pem: String },
}

/// Whose tokens a revocation revokes: every token of `user` for `backend` (`POST /ctrl/b/revoke`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHolder {
    pub backend: BackendId,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerToProxy {
    RouteResponse {
        token: ConnectionToken,
        route: Option<RouteInfo>,
    },
    /// The backend is terminating or gone: forget every route to it. With `terminated` (it is
    /// terminated, e.g. lost when another backend took its key over), also close every open tunnel
    /// to it at once: its process may still run (a frozen drone cannot stop it), and it must not
    /// answer clients any more. A terminating backend's tunnels stay open for its grace period.
    BackendRemoved {
        backend: BackendId,
        #[serde(default)]
        terminated: bool,
    },
    /// These tokens were revoked: forget them. With `holder` (Hangar extension), forget too every
    /// cached route of that backend and user, whichever tokens they came with: a token the store no
    /// longer has (PostgreSQL may forget the tokens of the last moments before a crash) is not in
    /// `tokens`, but may still be cached.
    TokensRevoked {
        tokens: Vec<ConnectionToken>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<TokenHolder>,
    },
    /// Hangar extension, the answer to a [`ProxyToController::KeepAlive`] for a backend that holds a
    /// key: its key lease still ran `remaining_ms` milliseconds when the keepalive was recorded. The
    /// proxy extends its routes and tunnels to the backend until that long after it sent the
    /// keepalive (see [`RouteInfo::lease_remaining_ms`]); `0` means the lease has run out.
    KeyLease {
        backend: BackendId,
        remaining_ms: u64,
    },

    // ---- TLS: cluster certificate via ACME (plane-api.md §7.9.3) ----
    /// Answer to [`ProxyToController::CertLeaseRequest`]: `accepted` means this proxy holds the
    /// cluster's certificate lease for the next [`crate::timing::CERT_LEASE`].
    CertLeaseResponse { accepted: bool },
    /// Answer to [`ProxyToController::SetTxtRecord`]: `accepted` means the value is stored (this proxy
    /// holds the lease).
    SetTxtRecordResponse { accepted: bool },
    /// An ACME HTTP-01 challenge answer set (`Some`) or withdrawn (`None`) by the cluster's lease holder;
    /// pushed to every proxy of the cluster. Serve `key_authorization` at
    /// `/.well-known/acme-challenge/<token>` while it is set.
    HttpChallenge {
        token: String,
        key_authorization: Option<String>,
    },
    /// The cluster's current certificate (PEM chain, PEM private key): pushed to every proxy of the
    /// cluster when a proxy stores a new one, and sent right after the handshake when the cluster has
    /// one. Install it for new TLS handshakes. Holds a private key: never log this message.
    Certificate { cert_pem: String, key_pem: String },
}

/// First frame an ACME DNS responder sends on `/ctrl/dns-socket`; the controller answers with
/// [`HelloResponse`]. Separate from [`Hello`] because a DNS responder belongs to no cluster and is not a
/// drone or proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsHello {
    /// [`crate::PROTOCOL_VERSION`] of the responder.
    pub protocol: u32,
    /// Hangar version of the responder (informational).
    pub version: String,
    pub name: DnsName,
}

impl DnsHello {
    /// This build's hello for responder `name`: [`crate::PROTOCOL_VERSION`] and [`crate::VERSION`].
    pub fn new(name: DnsName) -> Self {
        DnsHello {
            protocol: crate::PROTOCOL_VERSION,
            version: crate::VERSION.to_string(),
            name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsToController {
    /// Asks for the ACME DNS-01 TXT value the cluster's proxy stored. The controller answers every
    /// request with a [`ControllerToDns::TxtRecordResponse`] for the same cluster.
    TxtRecordRequest { cluster: ClusterName },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerToDns {
    /// `txt_value: None` when the cluster has no certificate lease or no value set yet.
    TxtRecordResponse {
        cluster: ClusterName,
        txt_value: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_roundtrip() {
        let m = DroneToController::Heartbeat {
            local_time: Millis(5),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"Heartbeat":{"local_time":5}}"#);
        assert_eq!(serde_json::from_str::<DroneToController>(&s).unwrap(), m);

        let a = ControllerToDrone::Action(ActionMessage {
            action_id: ActionId::random(),
            backend_id: BackendId::random(),
            action: BackendAction::Spawn {
                executable: serde_json::from_value(json!({"command": ["x"]})).unwrap(),
                key: AcquiredKey {
                    key: KeyConfig::named("k".parse().unwrap()),
                    deadlines: KeyDeadlines::from_base(Millis(0)),
                    token: 7,
                },
                static_token: None,
            },
        });
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<ControllerToDrone>(&s).unwrap(), a);
    }

    #[test]
    fn dns_messages_roundtrip() {
        let m = DnsToController::TxtRecordRequest {
            cluster: "c1.example.com".parse().unwrap(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"TxtRecordRequest":{"cluster":"c1.example.com"}}"#);
        assert_eq!(serde_json::from_str::<DnsToController>(&s).unwrap(), m);
        let r: ControllerToDns = serde_json::from_str(
            r#"{"TxtRecordResponse":{"cluster":"c1.example.com","txt_value":null}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ControllerToDns::TxtRecordResponse {
                cluster: "c1.example.com".parse().unwrap(),
                txt_value: None
            }
        );
        assert!(serde_json::from_str::<DnsHello>(
            r#"{"protocol":1,"version":"x","name":"px-abc"}"#
        )
        .is_err());
    }

    #[test]
    fn tls_messages_roundtrip() {
        for m in [
            ProxyToController::CertLeaseRequest,
            ProxyToController::ReleaseCertLease,
            ProxyToController::SetTxtRecord {
                txt_value: Some("abc".into()),
            },
            ProxyToController::SetTxtRecord { txt_value: None },
            ProxyToController::SetHttpChallenge {
                token: "tok".into(),
                key_authorization: Some("tok.thumb".into()),
            },
            ProxyToController::StoreCertificate {
                cert_pem: "-----BEGIN CERTIFICATE-----".into(),
                key_pem: "-----BEGIN PRIVATE KEY-----".into(),
            },
        ] {
            let s = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<ProxyToController>(&s).unwrap(), m);
        }
        assert_eq!(
            serde_json::to_string(&ProxyToController::CertLeaseRequest).unwrap(),
            r#""CertLeaseRequest""#
        );
        for m in [
            ControllerToProxy::CertLeaseResponse { accepted: true },
            ControllerToProxy::SetTxtRecordResponse { accepted: false },
            ControllerToProxy::HttpChallenge {
                token: "tok".into(),
                key_authorization: None,
            },
            ControllerToProxy::Certificate {
                cert_pem: "c".into(),
                key_pem: "k".into(),
            },
            ControllerToProxy::KeyLease {
                backend: "ba-abc".parse().unwrap(),
                remaining_ms: 41_000,
            },
        ] {
            let s = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<ControllerToProxy>(&s).unwrap(), m);
        }
        assert_eq!(
            serde_json::to_value(ControllerToProxy::CertLeaseResponse { accepted: true }).unwrap(),
            json!({"CertLeaseResponse": {"accepted": true}})
        );
    }

    #[test]
    fn route_info_lease_is_optional_on_the_wire() {
        let old = json!({
            "backend_id": "ba-abc",
            "address": "127.0.0.1:8080",
            "secret_token": "",
            "cluster": "localhost:9090",
            "user": null,
            "user_data": null,
            "subdomain": null,
        });
        let route: RouteInfo = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(route.lease_remaining(), None);
        assert_eq!(serde_json::to_value(&route).unwrap(), old);
        let bounded = RouteInfo {
            lease_remaining_ms: Some(1500),
            ..route
        };
        let back: RouteInfo =
            serde_json::from_value(serde_json::to_value(&bounded).unwrap()).unwrap();
        assert_eq!(
            back.lease_remaining(),
            Some(std::time::Duration::from_millis(1500))
        );
    }

    #[test]
    fn backend_metrics_roundtrip() {
        let m = DroneToController::BackendMetrics {
            backend_id: "ba-abc".parse().unwrap(),
            mem_used: 1,
            mem_limit: 2,
            cpu_used_ns: 3,
            sys_cpu_ns: 4,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"BackendMetrics":{"backend_id":"ba-abc","mem_used":1,"mem_limit":2,"cpu_used_ns":3,"sys_cpu_ns":4}}"#
        );
        assert_eq!(serde_json::from_str::<DroneToController>(&s).unwrap(), m);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(serde_json::from_str::<DroneToController>("{\"Nope\":1}").is_err());
        assert!(serde_json::from_str::<Hello>("[]").is_err());
    }

    #[test]
    fn deadlines_from_base() {
        let d = KeyDeadlines::from_base(Millis(1000));
        assert_eq!(d.renew_at, Millis(31_000));
        assert_eq!(d.soft_terminate_at, Millis(41_000));
        assert_eq!(d.hard_terminate_at, Millis(51_000));
    }
}
