//! Actions queued for drones: stored until the drone acknowledges them.

use super::notify::{self, Notice};
use super::rows::{json_column, to_json};
use super::PostgresStore;
use crate::events::StoreEvent;
use crate::model::NodeId;
use crate::StoreResult;
use hangar_types::protocol::{ActionMessage, BackendAction};
use hangar_types::{ActionId, BackendId, Millis, TerminationKind, TerminationReason};
use sqlx::{PgConnection, Row};

pub(super) async fn insert_action(
    conn: &mut PgConnection,
    drone: NodeId,
    action: &ActionMessage,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO backend_action (action_id, backend_id, drone_id, action, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
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
    s: &PostgresStore,
    id: &BackendId,
    kind: TerminationKind,
    reason: TerminationReason,
) -> StoreResult<Option<ActionMessage>> {
    let mut tx = s.pool.begin().await?;
    // Remembered (first request only) so that the sweeper does not queue another terminate every pass.
    let row = sqlx::query(
        "UPDATE backend \
         SET terminate_requested_at = COALESCE(terminate_requested_at, hangar_now_ms($1)) \
         WHERE id = $2 RETURNING drone_id, hangar_now_ms($1) AS now",
    )
    .bind(s.offset())
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let drone: NodeId = row.try_get("drone_id")?;
    let now = Millis(row.try_get("now")?);
    let action = ActionMessage {
        action_id: ActionId::random(),
        backend_id: id.clone(),
        action: BackendAction::Terminate { kind, reason },
    };
    insert_action(&mut tx, drone, &action, now).await?;
    let notice = Notice::Action {
        drone,
        action_id: action.action_id.clone(),
    };
    notify::send(&mut tx, &s.origin, vec![notice]).await?;
    tx.commit().await?;

    s.events.publish(StoreEvent::Action {
        drone,
        action: action.clone(),
    });
    Ok(Some(action))
}

pub(super) async fn pending_actions(
    s: &PostgresStore,
    drone: NodeId,
    limit: u32,
) -> StoreResult<Vec<ActionMessage>> {
    let rows = sqlx::query(
        "SELECT action FROM backend_action WHERE drone_id = $1 AND acked_at IS NULL \
         ORDER BY seq LIMIT $2",
    )
    .bind(drone)
    .bind(i64::from(limit))
    .fetch_all(&s.pool)
    .await?;
    rows.iter()
        .map(|row| json_column(row, "action", "action"))
        .collect()
}

pub(super) async fn ack_action(
    s: &PostgresStore,
    drone: NodeId,
    action: &ActionId,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE backend_action SET acked_at = hangar_now_ms($1) \
         WHERE action_id = $2 AND drone_id = $3 AND acked_at IS NULL",
    )
    .bind(s.offset())
    .bind(action.as_str())
    .bind(drone)
    .execute(&s.pool)
    .await?;
    Ok(())
}
