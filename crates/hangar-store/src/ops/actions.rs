//! Actions queued for drones: stored until the drone acknowledges them.

use super::chain::Chain;
use super::rows::json;
use super::{commit, tuples, Conn, D, S};
use crate::dialect::render;
use crate::events::StoreEvent;
use crate::model::NodeId;
use crate::StoreResult;
use hangar_types::protocol::{ActionMessage, BackendAction};
use hangar_types::{ActionId, BackendId, Millis, TerminationKind, TerminationReason};
use sqlx::types::Json;
use sqlx::Row;

pub(super) async fn insert_action(
    conn: &mut Conn,
    drone: NodeId,
    action: &ActionMessage,
    now: Millis,
) -> StoreResult<()> {
    insert_actions(conn, &[(drone, action)], now).await
}

/// Queues `actions`, each for its drone, with one statement.
pub(super) async fn insert_actions(
    conn: &mut Conn,
    actions: &[(NodeId, &ActionMessage)],
    now: Millis,
) -> StoreResult<()> {
    let mut chain = Chain::new();
    push_actions(&mut chain, actions, now)?;
    chain.run(conn).await?;
    Ok(())
}

/// Adds to `chain` the queueing of `actions`, each for its drone, as one write.
pub(super) fn push_actions<'q>(
    chain: &mut Chain<'q>,
    actions: &[(NodeId, &'q ActionMessage)],
    now: Millis,
) -> StoreResult<()> {
    let now = chain.bind(now.0)?;
    let mut rows = Vec::with_capacity(actions.len());
    for (drone, action) in actions {
        let id = chain.bind(action.action_id.as_str())?;
        let backend = chain.bind(action.backend_id.as_str())?;
        let drone = chain.bind(*drone)?;
        let action = chain.bind(Json(*action))?;
        rows.push(format!("(${id}, ${backend}, ${drone}, ${action}, ${now})"));
    }
    chain.push(&format!(
        "INSERT INTO backend_action (action_id, backend_id, drone_id, action, created_at) VALUES {}",
        rows.join(", ")
    ));
    Ok(())
}

pub(super) async fn queue_terminate(
    s: &S,
    id: &BackendId,
    kind: TerminationKind,
    reason: TerminationReason,
) -> StoreResult<Option<ActionMessage>> {
    let mut tx = s.writer.begin().await?;
    // Remembered (first request only) so that the sweeper does not queue another terminate every pass.
    let row = sqlx::query(sql!(
        "UPDATE backend SET terminate_requested_at = COALESCE(terminate_requested_at, {now}) \
         WHERE id = $2 RETURNING drone_id, {now} AS now"
    ))
    .bind(s.clock())
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let drone: NodeId = row.try_get("drone_id")?;
    let action = ActionMessage {
        action_id: ActionId::random(),
        backend_id: id.clone(),
        action: BackendAction::Terminate { kind, reason },
    };
    insert_action(&mut tx, drone, &action, Millis(row.try_get("now")?)).await?;
    let event = StoreEvent::Action {
        drone,
        action: action.clone(),
    };
    commit(s, tx, vec![event.into()]).await?;
    Ok(Some(action))
}

pub(super) async fn pending_actions(
    s: &S,
    drone: NodeId,
    limit: u32,
) -> StoreResult<Vec<ActionMessage>> {
    let rows = sqlx::query(
        "SELECT action FROM backend_action WHERE drone_id = $1 AND acked_at IS NULL \
         ORDER BY seq LIMIT $2",
    )
    .bind(drone)
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| json(row, "action", "action"))
        .collect()
}

/// Marks `acks` acked, each only if it is an action of the drone beside it (a drone cannot ack another
/// drone's actions), with one statement.
pub(super) async fn ack_actions(
    conn: &mut Conn,
    clock: i64,
    acks: &[(NodeId, &ActionId)],
) -> StoreResult<()> {
    let sql = render::<D>(&format!(
        "UPDATE backend_action SET acked_at = {{now}} FROM (VALUES {}) AS v \
         WHERE backend_action.drone_id = v.column1 AND backend_action.action_id = v.column2 \
         AND backend_action.acked_at IS NULL",
        tuples(2, 2, acks.len())
    ));
    let mut query = sqlx::query(&sql).bind(clock);
    for (drone, action) in acks {
        query = query.bind(*drone).bind(action.as_str());
    }
    query.execute(conn).await?;
    Ok(())
}
