//! Nodes (drones and proxies), their sessions, drone scheduling data, and controller liveness.
//!
//! A registration takes the node over: the reconnecting session replaces the old one (a fresh
//! [`SessionId`]), and a late disconnect of the old session changes nothing.

use super::rows::parse;
use super::{millis_of, SqliteStore};
use crate::model::*;
use crate::{StoreError, StoreResult};
use hangar_types::api::{ClusterDroneState, ClusterState, NodeState};
use hangar_types::executable::ExecutorKind;
use hangar_types::{ClusterName, ControllerName, DroneName, Millis, NodeName, ProxyName};
use sqlx::{Row, SqliteConnection};
use std::collections::HashMap;
use std::time::Duration;

const DRONE: &str = "drone";
const PROXY: &str = "proxy";

/// Reported as `plane_hash` in cluster state: Hangar has no per-build hash.
const NODE_HASH: &str = "";

/// Who registers: the identity of a node and the session it opens.
struct NodeSession<'a> {
    kind: &'a str,
    cluster: &'a ClusterName,
    name: &'a str,
    controller: &'a ControllerName,
    version: &'a str,
}

/// Inserts or takes over the node row; returns its id and the new session.
async fn upsert_node(
    conn: &mut SqliteConnection,
    n: NodeSession<'_>,
    now: Millis,
) -> StoreResult<(NodeId, SessionId)> {
    let row = sqlx::query(
        "INSERT INTO node (kind, cluster, name, version, controller, session, connected_at) \
         VALUES (?, ?, ?, ?, ?, 1, ?) \
         ON CONFLICT (cluster, name, kind) DO UPDATE SET version = excluded.version, \
         controller = excluded.controller, session = node.session + 1, \
         connected_at = excluded.connected_at \
         RETURNING id, session",
    )
    .bind(n.kind)
    .bind(n.cluster.as_str())
    .bind(n.name)
    .bind(n.version)
    .bind(n.controller.as_str())
    .bind(now.0)
    .fetch_one(conn)
    .await?;
    Ok((row.try_get("id")?, row.try_get("session")?))
}

pub(super) async fn register_drone(
    s: &SqliteStore,
    reg: &DroneRegistration,
) -> StoreResult<Registration> {
    let now = s.clock();
    let mut tx = s.writer.begin().await?;
    let session = NodeSession {
        kind: DRONE,
        cluster: &reg.cluster,
        name: reg.name.as_str(),
        controller: &reg.controller,
        version: &reg.version,
    };
    let (node, session) = upsert_node(&mut tx, session, now).await?;
    // `draining` is kept. The heartbeat is cleared: the drone's clock base from an earlier session (maybe
    // an earlier boot) must not be used for deadlines; the drone sends a heartbeat right after connecting.
    sqlx::query(
        "INSERT INTO drone (id, pool, last_heartbeat, last_local_time) VALUES (?, ?, NULL, NULL) \
         ON CONFLICT (id) DO UPDATE SET pool = excluded.pool, last_heartbeat = NULL, \
         last_local_time = NULL",
    )
    .bind(node)
    .bind(&reg.pool)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM drone_executor WHERE drone_id = ?")
        .bind(node)
        .execute(&mut *tx)
        .await?;
    for executor in &reg.executors {
        sqlx::query(
            "INSERT INTO drone_executor (drone_id, executor) VALUES (?, ?) \
             ON CONFLICT (drone_id, executor) DO NOTHING",
        )
        .bind(node)
        .bind(executor.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Registration::Registered { node, session })
}

pub(super) async fn register_proxy(
    s: &SqliteStore,
    cluster: &ClusterName,
    name: &ProxyName,
    controller: &ControllerName,
    version: &str,
) -> StoreResult<Registration> {
    let now = s.clock();
    let mut conn = s.writer.acquire().await?;
    let session = NodeSession {
        kind: PROXY,
        cluster,
        name: name.as_str(),
        controller,
        version,
    };
    let (node, session) = upsert_node(&mut conn, session, now).await?;
    Ok(Registration::Registered { node, session })
}

pub(super) async fn node_disconnected(
    s: &SqliteStore,
    node: NodeId,
    session: SessionId,
) -> StoreResult<()> {
    sqlx::query("UPDATE node SET controller = NULL WHERE id = ? AND session = ?")
        .bind(node)
        .bind(session)
        .execute(&s.writer)
        .await?;
    Ok(())
}

pub(super) async fn drone_heartbeat(
    s: &SqliteStore,
    drone: NodeId,
    local_time: Millis,
) -> StoreResult<()> {
    let now = s.clock();
    sqlx::query("UPDATE drone SET last_heartbeat = ?, last_local_time = ? WHERE id = ?")
        .bind(now.0)
        .bind(local_time.0)
        .bind(drone)
        .execute(&s.writer)
        .await?;
    Ok(())
}

pub(super) async fn schedulable_drones(
    s: &SqliteStore,
    q: &DroneQuery,
) -> StoreResult<Vec<DroneCandidate>> {
    let now = s.clock();
    let oldest_heartbeat = now.0.saturating_sub(millis_of(q.max_heartbeat_age));
    // 70 = terminated.
    let rows = sqlx::query(
        "SELECT n.id, n.name, d.last_local_time, \
         (SELECT COUNT(*) FROM backend b WHERE b.drone_id = n.id AND b.last_status_number < 70) \
           AS backend_count \
         FROM node n JOIN drone d ON d.id = n.id JOIN controller c ON c.name = n.controller \
         WHERE n.kind = 'drone' AND n.cluster = ? \
         AND c.is_online = TRUE AND c.last_heartbeat > ? \
         AND d.draining = FALSE AND d.pool = ? \
         AND d.last_heartbeat IS NOT NULL AND d.last_heartbeat > ? \
         AND d.last_local_time IS NOT NULL \
         AND EXISTS (SELECT 1 FROM drone_executor e WHERE e.drone_id = n.id AND e.executor = ?) \
         ORDER BY n.id",
    )
    .bind(q.cluster.as_str())
    .bind(oldest_heartbeat)
    .bind(&q.pool)
    .bind(oldest_heartbeat)
    .bind(q.executor.to_string())
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| {
            let name: String = row.try_get("name")?;
            Ok(DroneCandidate {
                id: row.try_get("id")?,
                name: parse("drone name", &name)?,
                last_local_time: Millis(row.try_get("last_local_time")?),
                backend_count: row.try_get("backend_count")?,
            })
        })
        .collect()
}

/// Whole seconds from `then` to `now`, never negative.
fn age_seconds(now: Millis, then: Option<i64>) -> Option<i64> {
    then.map(|t| now.0.saturating_sub(t).max(0) / 1000)
}

fn executor_kind(s: &str) -> StoreResult<ExecutorKind> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| StoreError::Corrupt(format!("executor {s:?}: {e}")))
}

pub(super) async fn cluster_state(
    s: &SqliteStore,
    cluster: &ClusterName,
) -> StoreResult<ClusterState> {
    let now = s.clock();
    let mut executors: HashMap<NodeId, Vec<ExecutorKind>> = HashMap::new();
    let rows = sqlx::query(
        "SELECT e.drone_id, e.executor FROM drone_executor e JOIN node n ON n.id = e.drone_id \
         WHERE n.cluster = ? ORDER BY e.drone_id, e.executor",
    )
    .bind(cluster.as_str())
    .fetch_all(&s.reader)
    .await?;
    for row in &rows {
        let executor: String = row.try_get("executor")?;
        executors
            .entry(row.try_get("drone_id")?)
            .or_default()
            .push(executor_kind(&executor)?);
    }

    // 70 = terminated.
    let rows = sqlx::query(
        "SELECT n.id, n.kind, n.name, n.version, n.controller, d.draining, d.last_heartbeat, \
         d.pool, c.last_heartbeat AS controller_heartbeat, \
         (SELECT COUNT(*) FROM backend b WHERE b.drone_id = n.id AND b.last_status_number < 70) \
           AS backend_count \
         FROM node n LEFT JOIN drone d ON d.id = n.id \
         LEFT JOIN controller c ON c.name = n.controller \
         WHERE n.cluster = ? AND n.controller IS NOT NULL ORDER BY n.id",
    )
    .bind(cluster.as_str())
    .fetch_all(&s.reader)
    .await?;

    let mut state = ClusterState::default();
    for row in &rows {
        let id: NodeId = row.try_get("id")?;
        let kind: String = row.try_get("kind")?;
        let name: String = row.try_get("name")?;
        let controller: Option<String> = row.try_get("controller")?;
        let node_name = match kind.as_str() {
            DRONE => NodeName::Drone(parse::<DroneName>("drone name", &name)?),
            PROXY => NodeName::Proxy(parse::<ProxyName>("proxy name", &name)?),
            other => return Err(StoreError::Corrupt(format!("node kind {other:?}"))),
        };
        let node = NodeState {
            name: node_name,
            plane_version: row.try_get("version")?,
            plane_hash: NODE_HASH.to_string(),
            controller: controller
                .as_deref()
                .map(|c| parse("controller name", c))
                .transpose()?,
            controller_heartbeat_age: age_seconds(now, row.try_get("controller_heartbeat")?),
        };
        if kind == PROXY {
            state.proxies.push(node);
            continue;
        }
        let draining: Option<bool> = row.try_get("draining")?;
        let pool: Option<String> = row.try_get("pool")?;
        state.drones.push(ClusterDroneState {
            // Attached drones are ready; readiness beyond that is expressed by draining and heartbeat.
            ready: true,
            draining: draining.unwrap_or(false),
            last_heartbeat_age: age_seconds(now, row.try_get("last_heartbeat")?),
            backend_count: row.try_get("backend_count")?,
            node,
            pool: pool.unwrap_or_default(),
            executors: executors.remove(&id).unwrap_or_default(),
            executor_error: None,
        });
    }
    Ok(state)
}

pub(super) async fn drain_drone(
    s: &SqliteStore,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<bool>> {
    let mut tx = s.writer.begin().await?;
    let row = sqlx::query(
        "SELECT d.id, d.draining FROM node n JOIN drone d ON d.id = n.id \
         WHERE n.kind = 'drone' AND n.cluster = ? AND n.name = ?",
    )
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let id: NodeId = row.try_get("id")?;
    let was_draining: bool = row.try_get("draining")?;
    if !was_draining {
        sqlx::query("UPDATE drone SET draining = TRUE WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(!was_draining))
}

pub(super) async fn drone_attachment(
    s: &SqliteStore,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<DroneAttachment>> {
    let now = s.clock();
    let row = sqlx::query(
        "SELECT n.id, n.controller, n.session, d.last_heartbeat \
         FROM node n JOIN drone d ON d.id = n.id \
         WHERE n.kind = 'drone' AND n.cluster = ? AND n.name = ?",
    )
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&s.reader)
    .await?;
    row.map(|row| {
        let controller: Option<String> = row.try_get("controller")?;
        let last_heartbeat: Option<i64> = row.try_get("last_heartbeat")?;
        Ok(DroneAttachment {
            node: row.try_get("id")?,
            controller: controller
                .as_deref()
                .map(|c| parse("controller name", c))
                .transpose()?,
            session: row.try_get("session")?,
            heartbeat_age: last_heartbeat.map(|t| {
                Duration::from_millis(u64::try_from(now.0.saturating_sub(t)).unwrap_or(0))
            }),
        })
    })
    .transpose()
}

pub(super) async fn controller_heartbeat(
    s: &SqliteStore,
    controller: &ControllerName,
    online: bool,
) -> StoreResult<()> {
    let now = s.clock();
    sqlx::query(
        "INSERT INTO controller (name, first_seen, last_heartbeat, is_online) VALUES (?, ?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET last_heartbeat = excluded.last_heartbeat, \
         is_online = excluded.is_online",
    )
    .bind(controller.as_str())
    .bind(now.0)
    .bind(now.0)
    .bind(online)
    .execute(&s.writer)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_whole_non_negative_seconds() {
        assert_eq!(age_seconds(Millis(10_999), Some(1_000)), Some(9));
        assert_eq!(age_seconds(Millis(1_000), Some(5_000)), Some(0));
        assert_eq!(age_seconds(Millis(1_000), None), None);
    }

    #[test]
    fn executor_names_roundtrip() {
        for k in [ExecutorKind::Docker, ExecutorKind::Process] {
            assert_eq!(executor_kind(&k.to_string()).unwrap(), k);
        }
        assert!(executor_kind("vm").is_err());
    }
}
