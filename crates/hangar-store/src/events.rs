//! In-process fan-out of store events. Every store publishes here after a successful commit; the
//! PostgreSQL store also feeds it from LISTEN/NOTIFY so events from other controllers arrive too.

use hangar_types::protocol::{ActionMessage, TokenHolder};
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendId, BackendState, ClusterName, Millis};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::model::{NodeId, StoredCertificate};

// Events carry actions by value: the bus is bounded (`EVENT_BUFFER`), so the larger slots cost at most a
// few MiB, and subscribers can match on them without unboxing.
//
// Serde: the PostgreSQL store sends small events inline in its notifications (`postgres/notify.rs`), in
// the format its notices had before they were events (`kind: state`, …). Actions and certificates are
// sent as pointers to their rows, never serialized (no private key in a notification).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A backend's stored state advanced.
    #[serde(rename = "state")]
    BackendState {
        backend: BackendId,
        state: BackendState,
        time: Millis,
    },
    /// An action was queued for a drone.
    #[serde(skip)]
    Action {
        drone: NodeId,
        action: ActionMessage,
    },
    /// Tokens were revoked: `tokens`, the ones the store deleted, and every token of `holder`
    /// (always set by the store; `None` only in notices of a store that did not send it).
    TokensRevoked {
        tokens: Vec<ConnectionToken>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<TokenHolder>,
    },
    /// A cluster's ACME HTTP-01 challenge answer was set (`Some`) or withdrawn (`None`).
    HttpChallenge {
        cluster: ClusterName,
        token: String,
        key_authorization: Option<String>,
    },
    /// A proxy stored a new certificate for its cluster.
    #[serde(skip)]
    Certificate(StoredCertificate),
}

/// Capacity per subscriber. A subscriber that falls this far behind gets `Lagged` and must resync from
/// the store (status streams re-read history; node sessions re-read pending actions).
pub const EVENT_BUFFER: usize = 4096;

#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<StoreEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        EventBus { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.tx.subscribe()
    }

    /// Publishes to current subscribers (none is fine).
    pub fn publish(&self, event: StoreEvent) {
        let _ = self.tx.send(event);
    }
}
