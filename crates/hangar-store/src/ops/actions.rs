//! Actions queued for drones: stored until the drone acknowledges them.

use super::rows::json;
use super::{commit, placeholders, Conn, S};
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
    let rows: Vec<String> = (0..actions.len())
        .map(|i| format!("({}, $1)", placeholders(2 + 4 * i, 4)))
        .collect();
    let sql = format!(
        "INSERT INTO backend_action (action_id, backend_id, drone_id, action, created_at) VALUES {}",
        rows.join(", ")
    );
    let mut query = sqlx::query(&sql).bind(now.0);
    for (drone, action) in actions {
        query = query
            .bind(action.action_id.as_str())
            .bind(action.backend_id.as_str())
            .bind(*drone)
            .bind(Json(*action));
    }
    query.execute(conn).await?;
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

/// Marks `actions` of `drone` acked (those of another drone are left alone), with one statement.
pub(super) async fn ack_actions(
    conn: &mut Conn,
    clock: i64,
    drone: NodeId,
    actions: &[ActionId],
) -> StoreResult<()> {
    let ids: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
    sqlx::query(sql!(
        "UPDATE backend_action SET acked_at = {now} \
         WHERE drone_id = $2 AND acked_at IS NULL \
         AND action_id IN (SELECT value FROM {json_texts}($3))"
    ))
    .bind(clock)
    .bind(drone)
    .bind(Json(&ids))
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn ack_action(s: &S, drone: NodeId, action: &ActionId) -> StoreResult<()> {
    sqlx::query(sql!(
        "UPDATE backend_action SET acked_at = {now} \
         WHERE action_id = $2 AND drone_id = $3 AND acked_at IS NULL"
    ))
    .bind(s.clock())
    .bind(action.as_str())
    .bind(drone)
    .execute(&s.writer)
    .await?;
    Ok(())
}
