//! Relays events committed by other stores sharing the database (other controllers) onto this store's
//! [`EventBus`]: `LISTEN` on [`super::notify::CHANNEL`], skip this store's own notifications, resolve pointers
//! (actions, large states, certificates) by reading their rows, publish.
//!
//! A payload that does not decode (another Hangar version, a stray `NOTIFY`) is logged and skipped. A
//! lost listening connection is re-established by [`PgListener`]; notifications sent meanwhile are lost
//! (logged), which subscribers tolerate by resyncing from the store.

use super::notify::{Notice, Payload};
use super::ops::rows::{json, parsed};
use super::ops::tls::read_certificate;
use crate::events::{EventBus, StoreEvent};
use crate::StoreResult;
use hangar_types::Millis;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pause before listening again after an error (database down, reconnect refused).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Everything the listener needs to turn a notification into bus events.
pub(super) struct Relay {
    pub pool: PgPool,
    pub bus: EventBus,
    /// This store's origin: its own notifications were already published locally.
    pub origin: String,
}

pub(super) async fn run_event_listener(
    mut listener: PgListener,
    relay: Relay,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = listener.try_recv() => next,
        };
        match next {
            Ok(Some(notification)) => relay.forward(notification.payload()).await,
            Ok(None) => tracing::warn!(
                "Store event listener lost its database connection; events of other controllers \
                 sent meanwhile are missed"
            ),
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::warn!(%error, "Store event listener failed; listening again shortly");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }
}

impl Relay {
    async fn forward(&self, payload: &str) {
        let payload: Payload = match serde_json::from_str(payload) {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, "Ignoring a store notification that does not decode");
                return;
            }
        };
        if payload.origin == self.origin {
            return;
        }
        for notice in payload.events {
            match self.resolve(notice).await {
                Ok(Some(event)) => self.bus.publish(event),
                // Deleted meanwhile (cleanup): nobody needs it any more.
                Ok(None) => {}
                Err(error) => tracing::warn!(
                    %error,
                    "Cannot read the data of a store notification; the event is missed"
                ),
            }
        }
    }

    /// The event a notice stands for, reading pointed-to rows.
    async fn resolve(&self, notice: Notice) -> StoreResult<Option<StoreEvent>> {
        Ok(match notice {
            Notice::Inline(event) => Some(event),
            Notice::StateRow { history_id } => {
                let row = sqlx::query(
                    "SELECT backend_id, state, created_at FROM backend_state WHERE id = $1",
                )
                .bind(history_id)
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    None => None,
                    Some(row) => Some(StoreEvent::BackendState {
                        backend: parsed(&row, "backend_id", "backend id")?,
                        state: json(&row, "state", "backend state")?,
                        time: Millis(row.try_get("created_at")?),
                    }),
                }
            }
            Notice::Action { drone, action_id } => {
                let row = sqlx::query("SELECT action FROM backend_action WHERE action_id = $1")
                    .bind(action_id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                let action = row.map(|row| json(&row, "action", "action")).transpose()?;
                action.map(|action| StoreEvent::Action { drone, action })
            }
            // The row holds the newest certificate, which may be newer than the notified one: relaying
            // the newest is what subscribers want.
            Notice::Certificate { cluster } => read_certificate(&self.pool, &cluster)
                .await?
                .map(StoreEvent::Certificate),
        })
    }
}
