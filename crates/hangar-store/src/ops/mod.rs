//! Every store operation, written once for both databases: which statements run, in which transaction,
//! with which checks. What differs between the databases comes from the [`Dialect`] (`D`): SQL markers
//! (see [`crate::dialect`]), pools, the clock, relaying events to other stores, constraint names.
//!
//! Compiled once per database (ARCHITECTURE.md, "Store", says why): `sqlite.rs` and `postgres.rs`
//! each mount this directory (`#[path = "ops/mod.rs"]`) naming their dialect `D`, so every sqlx type
//! here is concrete.
//!
//! Every method is one transaction (or one statement). Events are relayed to other stores inside the
//! transaction and published on this store's bus only after the commit ([`commit`]), so a subscriber
//! that reacts to an event always finds the data in the store.
//!
//! Status numbers ([`hangar_types::BackendStatus::number`]) appear as literals in some SQL (`50` ready,
//! `60` terminating, `70` terminated) to match the partial indexes declared with the same literals; a
//! test pins them.

/// The dialect's text of a shared statement, rendered once per call site (one per database, as this
/// module is compiled per database).
macro_rules! sql {
    ($template:expr) => {{
        static RENDERED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        RENDERED
            .get_or_init(|| $crate::dialect::render::<super::D>($template))
            .as_str()
    }};
}

mod actions;
mod backends;
mod chain;
mod cleanup;
mod controllers;
mod dashboard;
mod lost;
mod nodes;
pub(super) mod rows;
pub(super) mod tls;
mod tokens;
mod warm_pools;

use super::D;
use crate::dialect::{Announced, Dialect, SqlStore};
use crate::model::*;
use crate::{Store, StoreResult};
use async_trait::async_trait;
use hangar_types::api::ClusterState;
use hangar_types::protocol::ActionMessage;
use hangar_types::token::ConnectionToken;
use hangar_types::warm_pool::WarmPoolConfig;
use hangar_types::{
    ActionId, BackendId, BackendState, ClusterName, ControllerName, DroneName, Millis, ProxyName,
    TerminationKind, TerminationReason, WarmPoolName,
};
use std::time::Duration;

/// This database's sqlx type.
pub(super) type Db = <D as Dialect>::Db;
pub(super) type S = SqlStore<D>;
pub(super) type Tx<'c> = sqlx::Transaction<'c, Db>;
pub(super) type Conn = <Db as sqlx::Database>::Connection;

/// Relays `events` inside `tx`, commits, then publishes them on this store's bus.
async fn commit(s: &S, mut tx: Tx<'_>, events: Vec<Announced>) -> StoreResult<()> {
    s.dialect.relay(&mut tx, &events).await?;
    tx.commit().await?;
    for a in events {
        s.events.publish(a.event);
    }
    Ok(())
}

/// `impl Store`: every method but `events` calls the function of the same name in the module named
/// before it (`module::name(self, args…)`), within the call deadline (`src/deadline.rs`).
macro_rules! impl_store {
    ($($module:ident::$name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        #[async_trait]
        impl Store for S {
            fn events(&self) -> &crate::EventBus {
                &self.events
            }
            $(
                async fn $name(&self, $($arg: $ty),*) -> StoreResult<$ret> {
                    self.within_deadline($module::$name(self, $($arg),*)).await
                }
            )*
        }
    };
}

impl_store! {
    backends::record_drone_reports(
        drone: NodeId, acks: &[ActionId], states: &[(BackendId, BackendState)]
    ) -> Vec<StateUpdate>;
    clock::now() -> Millis;
    clock::health() -> ();
    backends::key_lookup(key: &KeyRef) -> KeyLookup;
    backends::take_over_expired_key(key: &KeyRef, holder: &BackendId, lost: &BackendState) -> bool;
    backends::insert_backend_with_key(new: NewBackend) -> Acquire;
    tokens::insert_token(token: NewToken) -> ();
    tokens::revoke_tokens(backend: &BackendId, user: &str) -> Vec<ConnectionToken>;
    nodes::schedulable_drones(query: &DroneQuery) -> Vec<DroneCandidate>;
    backends::backend(id: &BackendId) -> Option<BackendRow>;
    backends::record_backend_state(id: &BackendId, state: &BackendState) -> StateUpdate;
    backends::backend_history(id: &BackendId) -> Vec<(BackendState, Millis)>;
    actions::queue_terminate(
        id: &BackendId, kind: TerminationKind, reason: TerminationReason
    ) -> Option<ActionMessage>;
    backends::sweep_candidates(drone: NodeId) -> Vec<BackendId>;
    backends::keepalive(id: &BackendId, proxy: NodeId, connected: bool) -> KeepAlive;
    tokens::resolve_token(token: &ConnectionToken) -> TokenLookup;
    actions::pending_actions(drone: NodeId, limit: u32) -> Vec<ActionMessage>;
    backends::ack_action(drone: NodeId, action: &ActionId) -> ();
    nodes::register_drone(reg: &DroneRegistration) -> Registration;
    nodes::register_proxy(
        cluster: &ClusterName, name: &ProxyName, controller: &ControllerName, version: &str
    ) -> Registration;
    nodes::node_disconnected(node: NodeId, session: SessionId) -> ();
    nodes::drone_heartbeat(drone: NodeId, local_time: Millis) -> ();
    backends::renew_key(backend: &BackendId) -> bool;
    nodes::cluster_nodes(cluster: &ClusterName, include_detached: bool) -> ClusterState;
    nodes::drain_drone(cluster: &ClusterName, drone: &DroneName) -> Option<bool>;
    nodes::controller_heartbeat(controller: &ControllerName, online: bool) -> ();
    cleanup::cleanup(min_age: Option<Duration>, batch: u32) -> u64;
    lost::lost_backends(max_heartbeat_age: Duration, limit: u32) -> Vec<LiveBackend>;
    lost::drone_live_backends(
        cluster: &ClusterName, drone: &DroneName
    ) -> Option<Vec<LiveBackend>>;
    lost::prevent_renew(backend: &BackendId) -> bool;
    nodes::drone_attachment(cluster: &ClusterName, drone: &DroneName) -> Option<DroneAttachment>;
    tls::acquire_cert_lease(cluster: &ClusterName, proxy: NodeId) -> bool;
    tls::release_cert_lease(cluster: &ClusterName, proxy: NodeId) -> bool;
    tls::set_txt_record(cluster: &ClusterName, proxy: NodeId, txt_value: Option<&str>) -> bool;
    tls::txt_record(cluster: &ClusterName) -> Option<String>;
    tls::set_http_challenge(
        cluster: &ClusterName, proxy: NodeId, token: &str, key_authorization: Option<&str>
    ) -> bool;
    tls::http_challenges(cluster: &ClusterName) -> Vec<HttpChallenge>;
    tls::store_certificate(
        cluster: &ClusterName, proxy: NodeId, cert_pem: &str, key_pem: &str
    ) -> StoredCertificate;
    tls::certificate(cluster: &ClusterName) -> Option<StoredCertificate>;
    dashboard::active_clusters(limit: u32) -> Vec<ClusterName>;
    dashboard::list_backends(filter: &BackendFilter) -> Vec<BackendRow>;
    warm_pools::put_warm_pool(
        name: &WarmPoolName, cluster: &ClusterName, config: &WarmPoolConfig
    ) -> WarmPoolRow;
    warm_pools::warm_pools() -> Vec<WarmPoolRow>;
    warm_pools::warm_pool(name: &WarmPoolName) -> Option<WarmPoolRow>;
    warm_pools::delete_warm_pool(name: &WarmPoolName) -> bool;
    warm_pools::unclaimed_backends() -> Vec<UnclaimedBackend>;
    warm_pools::insert_warm_backend(new: NewWarmBackend) -> WarmInsert;
    warm_pools::claim_warm_backend(claim: WarmClaim) -> WarmClaimOutcome;
    dashboard::live_backend_counts() -> Vec<BackendCount>;
    controllers::set_controller_url(controller: &ControllerName, url: &str) -> ();
    controllers::drone_controller(
        cluster: &ClusterName, drone: &DroneName
    ) -> Option<DroneController>;
    tokens::reuse_key(reuse: KeyReuse) -> Reuse;
}

/// The store clock and a health probe.
mod clock {
    use super::S;
    use crate::dialect::Clock;
    use crate::StoreResult;
    use hangar_types::Millis;

    pub(super) async fn now(s: &S) -> StoreResult<Millis> {
        let clock = match s.read_clock() {
            Clock::Local(now) => return Ok(now),
            Clock::Database { offset_ms } => offset_ms,
        };
        let now = sqlx::query_scalar(sql!("SELECT {now}"))
            .bind(clock)
            .fetch_one(&s.reader)
            .await?;
        Ok(Millis(now))
    }

    /// A cheap round trip (`SELECT 1`) on each pool.
    pub(super) async fn health(s: &S) -> StoreResult<()> {
        if s.separate_reader {
            sqlx::query("SELECT 1").execute(&s.reader).await?;
        }
        sqlx::query("SELECT 1").execute(&s.writer).await?;
        Ok(())
    }
}

/// `$first, $first+1, …` (`count` parameters).
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|p| format!("${p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `rows` parenthesized tuples of `columns` parameters each, numbered from `first`.
pub(super) fn tuples(first: usize, columns: usize, rows: usize) -> String {
    (0..rows)
        .map(|row| format!("({})", placeholders(first + row * columns, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use hangar_types::BackendStatus;

    /// The SQL here spells these numbers out; they must not drift.
    #[test]
    fn status_numbers_used_in_sql() {
        assert_eq!(BackendStatus::Ready.number(), 50);
        assert_eq!(BackendStatus::Terminating.number(), 60);
        assert_eq!(BackendStatus::Terminated.number(), 70);
    }
}
