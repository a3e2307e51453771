//! Nodes (drones and proxies), their sessions, drone scheduling data, and controller liveness.
//!
//! A registration takes the node over: the reconnecting session replaces the old one (a fresh
//! [`SessionId`]), and a late disconnect of the old session changes nothing. Concurrent registrations of
//! one node (through two controllers) serialize on the node row; the last one holds the node.

use super::rows::{age, parsed, parsed_opt};
use super::{Conn, S};
use crate::dialect::millis_of;
use crate::group_commit::Pending;
use crate::model::*;
use crate::{StoreError, StoreResult};
use hangar_types::api::{ClusterDroneState, ClusterState, NodeState};
use hangar_types::executable::ExecutorKind;
use hangar_types::{ClusterName, ControllerName, DroneName, Millis, NodeName, ProxyName};
use sqlx::types::Json;
use sqlx::Row;
use std::collections::HashMap;

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
    conn: &mut Conn,
    n: NodeSession<'_>,
    clock: i64,
) -> StoreResult<(NodeId, SessionId)> {
    let row = sqlx::query(sql!(
        "INSERT INTO node (kind, cluster, name, version, controller, session, connected_at) \
         VALUES ($2, $3, $4, $5, $6, 1, {now}) \
         ON CONFLICT (cluster, name, kind) DO UPDATE SET version = excluded.version, \
         controller = excluded.controller, session = node.session + 1, \
         connected_at = excluded.connected_at \
         RETURNING id, session"
    ))
    .bind(clock)
    .bind(n.kind)
    .bind(n.cluster.as_str())
    .bind(n.name)
    .bind(n.version)
    .bind(n.controller.as_str())
    .fetch_one(conn)
    .await?;
    Ok((row.try_get("id")?, row.try_get("session")?))
}

pub(super) async fn register_drone(s: &S, reg: &DroneRegistration) -> StoreResult<Registration> {
    let mut tx = s.writer.begin().await?;
    let session = NodeSession {
        kind: DRONE,
        cluster: &reg.cluster,
        name: reg.name.as_str(),
        controller: &reg.controller,
        version: &reg.version,
    };
    let (node, session) = upsert_node(&mut tx, session, s.clock()).await?;
    // `draining` is kept. The heartbeat is cleared: the drone's clock base from an earlier session (maybe
    // an earlier boot) must not be used for deadlines; the drone sends a heartbeat right after connecting.
    sqlx::query(
        "INSERT INTO drone (id, pool, last_heartbeat, last_local_time) VALUES ($1, $2, NULL, NULL) \
         ON CONFLICT (id) DO UPDATE SET pool = excluded.pool, last_heartbeat = NULL, \
         last_local_time = NULL",
    )
    .bind(node)
    .bind(&reg.pool)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM drone_executor WHERE drone_id = $1")
        .bind(node)
        .execute(&mut *tx)
        .await?;
    let executors: Vec<String> = reg.executors.iter().map(|e| e.to_string()).collect();
    // `WHERE TRUE`: SQLite needs it to tell the upsert's ON from a join's.
    sqlx::query(sql!(
        "INSERT INTO drone_executor (drone_id, executor) \
         SELECT $1, value FROM {json_texts}($2) WHERE TRUE \
         ON CONFLICT (drone_id, executor) DO NOTHING"
    ))
    .bind(node)
    .bind(Json(&executors))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Registration::Registered { node, session })
}

pub(super) async fn register_proxy(
    s: &S,
    cluster: &ClusterName,
    name: &ProxyName,
    controller: &ControllerName,
    version: &str,
) -> StoreResult<Registration> {
    let mut conn = s.writer.acquire().await?;
    let session = NodeSession {
        kind: PROXY,
        cluster,
        name: name.as_str(),
        controller,
        version,
    };
    let (node, session) = upsert_node(&mut conn, session, s.clock()).await?;
    Ok(Registration::Registered { node, session })
}

pub(super) async fn node_disconnected(s: &S, node: NodeId, session: SessionId) -> StoreResult<()> {
    sqlx::query("UPDATE node SET controller = NULL WHERE id = $1 AND session = $2")
        .bind(node)
        .bind(session)
        .execute(&s.writer)
        .await?;
    Ok(())
}

pub(super) async fn drone_heartbeat(s: &S, drone: NodeId, local_time: Millis) -> StoreResult<()> {
    sqlx::query(sql!(
        "UPDATE drone SET last_heartbeat = {now}, last_local_time = $2 WHERE id = $3"
    ))
    .bind(s.clock())
    .bind(local_time.0)
    .bind(drone)
    .execute(&s.writer)
    .await?;
    Ok(())
}

/// Gathered like a group-committed write ([`crate::group_commit`]): the scheduler reads of concurrent
/// connects are answered by one statement per distinct query. A batch is read only after every call in
/// it was made, so each call still sees everything committed before it.
pub(super) async fn schedulable_drones(s: &S, q: &DroneQuery) -> StoreResult<Vec<DroneCandidate>> {
    s.drone_reads
        .write(q.clone(), |batch| read_drone_batch(s, batch))
        .await
}

/// Answers every call of `batch`, reading each distinct query once (a failed read answers only its own
/// call; the next call with that query reads again).
async fn read_drone_batch(s: &S, batch: Vec<Pending<DroneQuery, Vec<DroneCandidate>>>) {
    let mut read: Vec<(DroneQuery, Vec<DroneCandidate>)> = Vec::new();
    for (query, done) in batch {
        let answer = match read.iter().find(|(seen, _)| *seen == query) {
            Some((_, found)) => Ok(found.clone()),
            None => {
                let found = read_drones(s, &query).await;
                if let Ok(found) = &found {
                    read.push((query, found.clone()));
                }
                found
            }
        };
        let _ = done.send(answer);
    }
}

async fn read_drones(s: &S, q: &DroneQuery) -> StoreResult<Vec<DroneCandidate>> {
    // 70 = terminated.
    let rows = sqlx::query(sql!(
        "SELECT n.id, n.name, d.last_local_time, \
         (SELECT COUNT(*) FROM backend b WHERE b.drone_id = n.id AND b.last_status_number < 70) \
           AS backend_count \
         FROM node n JOIN drone d ON d.id = n.id JOIN controller c ON c.name = n.controller \
         WHERE n.kind = 'drone' AND n.cluster = $2 \
         AND c.is_online AND c.last_heartbeat > {now} - $4 \
         AND NOT d.draining AND d.pool = $3 \
         AND d.last_heartbeat IS NOT NULL AND d.last_heartbeat > {now} - $4 \
         AND d.last_local_time IS NOT NULL \
         AND EXISTS (SELECT 1 FROM drone_executor e WHERE e.drone_id = n.id AND e.executor = $5) \
         ORDER BY n.id"
    ))
    .bind(s.clock())
    .bind(q.cluster.as_str())
    .bind(&q.pool)
    .bind(millis_of(q.max_heartbeat_age))
    .bind(q.executor.to_string())
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(DroneCandidate {
                id: row.try_get("id")?,
                name: parsed(row, "name", "drone name")?,
                last_local_time: Millis(row.try_get("last_local_time")?),
                backend_count: row.try_get("backend_count")?,
            })
        })
        .collect()
}

fn executor_kind(s: &str) -> StoreResult<ExecutorKind> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| StoreError::Corrupt(format!("executor {s:?}: {e}")))
}

/// The drones and proxies of `cluster`; with `include_detached`, also those no controller holds now
/// (their `controller` is `None`).
pub(super) async fn cluster_nodes(
    s: &S,
    cluster: &ClusterName,
    include_detached: bool,
) -> StoreResult<ClusterState> {
    let mut executors: HashMap<NodeId, Vec<ExecutorKind>> = HashMap::new();
    let rows = sqlx::query(
        "SELECT e.drone_id, e.executor FROM drone_executor e JOIN node n ON n.id = e.drone_id \
         WHERE n.cluster = $1 ORDER BY e.drone_id, e.executor",
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

    // Ages in whole seconds, never negative, NULL without a heartbeat (the greatest of the clock and
    // NULL is NULL in SQLite and the clock in PostgreSQL; the subtraction makes both NULL).
    // 70 = terminated.
    let rows = sqlx::query(sql!(
        "SELECT n.id, n.kind, n.name, n.version, n.controller, d.draining, d.pool, \
         ({greatest}({now}, d.last_heartbeat) - d.last_heartbeat) / 1000 AS heartbeat_age, \
         ({greatest}({now}, c.last_heartbeat) - c.last_heartbeat) / 1000 \
           AS controller_heartbeat_age, \
         (SELECT COUNT(*) FROM backend b WHERE b.drone_id = n.id AND b.last_status_number < 70) \
           AS backend_count \
         FROM node n LEFT JOIN drone d ON d.id = n.id \
         LEFT JOIN controller c ON c.name = n.controller \
         WHERE n.cluster = $2 AND (n.controller IS NOT NULL OR $3) ORDER BY n.id"
    ))
    .bind(s.clock())
    .bind(cluster.as_str())
    .bind(include_detached)
    .fetch_all(&s.reader)
    .await?;

    let mut state = ClusterState::default();
    for row in &rows {
        let id: NodeId = row.try_get("id")?;
        let kind: String = row.try_get("kind")?;
        let node_name = match kind.as_str() {
            DRONE => NodeName::Drone(parsed(row, "name", "drone name")?),
            PROXY => NodeName::Proxy(parsed(row, "name", "proxy name")?),
            other => return Err(StoreError::Corrupt(format!("node kind {other:?}"))),
        };
        let node = NodeState {
            name: node_name,
            plane_version: row.try_get("version")?,
            plane_hash: NODE_HASH.to_string(),
            controller: parsed_opt(row, "controller", "controller name")?,
            controller_heartbeat_age: row.try_get("controller_heartbeat_age")?,
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
            last_heartbeat_age: row.try_get("heartbeat_age")?,
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
    s: &S,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<bool>> {
    let mut tx = s.writer.begin().await?;
    // Locked so that of two concurrent drains exactly one reports the change.
    let row = sqlx::query(sql!(
        "SELECT d.id, d.draining FROM node n JOIN drone d ON d.id = n.id \
         WHERE n.kind = 'drone' AND n.cluster = $1 AND n.name = $2 {lock:FOR UPDATE OF d}"
    ))
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
        sqlx::query("UPDATE drone SET draining = TRUE WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(!was_draining))
}

pub(super) async fn drone_attachment(
    s: &S,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<DroneAttachment>> {
    // The age is never negative and NULL without a heartbeat.
    let row = sqlx::query(sql!(
        "SELECT n.id, n.controller, n.session, \
         {greatest}({now}, d.last_heartbeat) - d.last_heartbeat AS heartbeat_age \
         FROM node n JOIN drone d ON d.id = n.id \
         WHERE n.kind = 'drone' AND n.cluster = $2 AND n.name = $3"
    ))
    .bind(s.clock())
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&s.reader)
    .await?;
    row.map(|row| {
        Ok(DroneAttachment {
            node: row.try_get("id")?,
            controller: parsed_opt(&row, "controller", "controller name")?,
            session: row.try_get("session")?,
            heartbeat_age: age(&row, "heartbeat_age")?,
        })
    })
    .transpose()
}

pub(super) async fn controller_heartbeat(
    s: &S,
    controller: &ControllerName,
    online: bool,
) -> StoreResult<()> {
    sqlx::query(sql!(
        "INSERT INTO controller (name, first_seen, last_heartbeat, is_online) \
         VALUES ($2, {now}, {now}, $3) \
         ON CONFLICT (name) DO UPDATE SET last_heartbeat = excluded.last_heartbeat, \
         is_online = excluded.is_online"
    ))
    .bind(s.clock())
    .bind(controller.as_str())
    .bind(online)
    .execute(&s.writer)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executor_names_roundtrip() {
        for k in [ExecutorKind::Docker, ExecutorKind::Process] {
            assert_eq!(executor_kind(&k.to_string()).unwrap(), k);
        }
        assert!(executor_kind("vm").is_err());
    }
}
