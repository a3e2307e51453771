//! Actions queued for drones: stored until the drone acknowledges them.

use super::rows::{from_json, to_json};
use super::SqliteStore;
use crate::events::StoreEvent;
use crate::model::NodeId;
use crate::StoreResult;
use hangar_types::protocol::{ActionMessage, BackendAction};
use hangar_types::{ActionId, BackendId, Millis, TerminationKind, TerminationReason};
use sqlx::SqliteConnection;

pub(super) async fn insert_action(
    conn: &mut SqliteConnection,
    drone: NodeId,
    action: &ActionMessage,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO backend_action (action_id, backend_id, drone_id, action, created_at) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(action.action_id.as_str())
    .bind(action.backend_id.as_str())
    .bind(drone)
    .bind(to_json("action", action)?)
    .bind(now.0)
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn queue_terminate(
    s: &SqliteStore,
    id: &BackendId,
    kind: TerminationKind,
    reason: TerminationReason,
) -> StoreResult<Option<ActionMessage>> {
    let now = s.clock();
    let mut tx = s.writer.begin().await?;
    let drone: Option<NodeId> = sqlx::query_scalar("SELECT drone_id FROM backend WHERE id = ?")
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    let Some(drone) = drone else {
        return Ok(None);
    };
    let action = ActionMessage {
        action_id: ActionId::random(),
        backend_id: id.clone(),
        action: BackendAction::Terminate { kind, reason },
    };
    insert_action(&mut tx, drone, &action, now).await?;
    // Remembered so that the sweeper does not queue another terminate every pass.
    sqlx::query(
        "UPDATE backend SET terminate_requested_at = ? \
         WHERE id = ? AND terminate_requested_at IS NULL",
    )
    .bind(now.0)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    s.events.publish(StoreEvent::Action {
        drone,
        action: action.clone(),
    });
    Ok(Some(action))
}

pub(super) async fn pending_actions(
    s: &SqliteStore,
    drone: NodeId,
    limit: u32,
) -> StoreResult<Vec<ActionMessage>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM backend_action WHERE drone_id = ? AND acked_at IS NULL \
         ORDER BY seq LIMIT ?",
    )
    .bind(drone)
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await?;
    rows.iter().map(|a| from_json("action", a)).collect()
}

pub(super) async fn ack_action(
    s: &SqliteStore,
    drone: NodeId,
    action: &ActionId,
) -> StoreResult<()> {
    let now = s.clock();
    sqlx::query(
        "UPDATE backend_action SET acked_at = ? \
         WHERE action_id = ? AND drone_id = ? AND acked_at IS NULL",
    )
    .bind(now.0)
    .bind(action.as_str())
    .bind(drone)
    .execute(&s.writer)
    .await?;
    Ok(())
}
