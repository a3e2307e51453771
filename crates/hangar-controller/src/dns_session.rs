//! One ACME DNS responder's WebSocket session (`/ctrl/dns-socket`, plane-api.md §3.6): the responder
//! asks for a cluster's DNS-01 TXT value, the controller answers from the store.
//!
//! Unlike Plane: every request gets an answer (`null` on a store error, logged), so a responder never
//! waits out its own timeout; a responder is not registered as a node (Plane added a node row per
//! connection, quirk 15); a bad frame is logged and skipped.

use crate::api::AppState;
use crate::node_socket::{self, NodeSender, SessionClosed, Welcomed};
use axum::extract::ws::WebSocket;
use hangar_store::Store;
use hangar_types::protocol::{ControllerToDns, DnsHello, DnsToController};
use hangar_types::{ClusterName, DnsName};
use std::sync::Arc;

/// Runs a DNS responder session on an upgraded socket until the responder leaves or the controller
/// shuts down.
pub async fn run_dns_session(state: AppState, mut socket: WebSocket) {
    let hello = match node_socket::read_first_frame::<DnsHello>(&mut socket, "DnsHello").await {
        Ok(hello) => hello,
        Err(reason) => return node_socket::refuse(socket, reason).await,
    };
    if let Err(reason) = node_socket::check_protocol(hello.protocol) {
        return node_socket::refuse(socket, reason).await;
    }
    let _counted = state
        .prometheus
        .node_session(crate::prometheus::NodeKind::Dns);
    let Some(Welcomed {
        sender,
        cancel,
        socket,
    }) = node_socket::welcome(socket, &state.config.name, &state.cancel).await
    else {
        return;
    };
    tracing::info!(dns = %hello.name, version = %hello.version, "DNS responder connected");
    let session = DnsSession {
        store: state.store.clone(),
        name: hello.name.clone(),
        sender,
    };
    socket
        .run(
            &cancel,
            &hello.name,
            |batch| session.handle_batch(batch),
            async {},
        )
        .await;
    tracing::info!(dns = %hello.name, "DNS responder disconnected");
}

struct DnsSession {
    store: Arc<dyn Store>,
    name: DnsName,
    sender: NodeSender<ControllerToDns>,
}

impl DnsSession {
    async fn handle_batch(&self, batch: Vec<DnsToController>) -> Result<(), SessionClosed> {
        for message in batch {
            match message {
                DnsToController::TxtRecordRequest { cluster } => self.txt_record(cluster).await?,
            }
        }
        Ok(())
    }

    async fn txt_record(&self, cluster: ClusterName) -> Result<(), SessionClosed> {
        let txt_value = match self.store.txt_record(&cluster).await {
            Ok(value) => value,
            Err(e) => {
                tracing::error!(dns = %self.name, %cluster, error = %e, "Failed to read TXT record");
                None
            }
        };
        tracing::debug!(dns = %self.name, %cluster, found = txt_value.is_some(), "TXT record request");
        self.sender
            .send(&ControllerToDns::TxtRecordResponse { cluster, txt_value })
            .await
    }
}
