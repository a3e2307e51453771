//! Connection tokens: dynamic tokens (one row each, expiring) and static tokens (on the backend row),
//! and their resolution to routes.

use super::notify::{self, Notice};
use super::rows::{json_column, parse, to_json};
use super::{millis_of, PostgresStore};
use crate::events::StoreEvent;
use crate::model::{NewToken, TokenLookup};
use crate::{StoreError, StoreResult};
use hangar_types::protocol::RouteInfo;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, BackendStatus};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::net::SocketAddr;

pub(super) async fn insert_token(s: &PostgresStore, token: NewToken) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO token (token, backend_id, secret, username, auth, expires_at) \
         VALUES ($1, $2, $3, $4, $5, hangar_now_ms($6) + $7)",
    )
    .bind(token.token.as_str())
    .bind(token.backend.as_str())
    .bind(token.secret.as_str())
    .bind(&token.user)
    .bind(to_json("token auth", &token.auth)?)
    .bind(s.offset())
    .bind(millis_of(token.lifetime))
    .execute(&s.pool)
    .await?;
    Ok(())
}

pub(super) async fn revoke_tokens(
    s: &PostgresStore,
    backend: &BackendId,
    user: &str,
) -> StoreResult<Vec<ConnectionToken>> {
    let mut tx = s.pool.begin().await?;
    let deleted: Vec<String> = sqlx::query_scalar(
        "DELETE FROM token WHERE backend_id = $1 AND username = $2 RETURNING token",
    )
    .bind(backend.as_str())
    .bind(user)
    .fetch_all(&mut *tx)
    .await?;
    let tokens: Vec<ConnectionToken> = deleted
        .iter()
        .map(|t| ConnectionToken::from_path_segment(t))
        .collect();
    if tokens.is_empty() {
        return Ok(tokens);
    }
    notify::send(&mut tx, &s.origin, Notice::tokens_revoked(&tokens)).await?;
    tx.commit().await?;
    s.events.publish(StoreEvent::TokensRevoked {
        tokens: tokens.clone(),
    });
    Ok(tokens)
}

pub(super) async fn resolve_token(
    s: &PostgresStore,
    token: &ConnectionToken,
) -> StoreResult<TokenLookup> {
    if token.is_static() {
        let row = sqlx::query(
            "SELECT b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address \
             FROM backend b WHERE b.static_token = $1",
        )
        .bind(token.as_str())
        .fetch_optional(&s.pool)
        .await?;
        return match row {
            None => Ok(TokenLookup::NotFound),
            Some(row) => lookup(&row, SecretToken::empty(), None, None),
        };
    }

    // Expired tokens are refused here even before cleanup deletes them.
    let row = sqlx::query(
        "SELECT t.secret, t.username, t.auth, \
         b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address \
         FROM token t JOIN backend b ON b.id = t.backend_id \
         WHERE t.token = $1 AND t.expires_at > hangar_now_ms($2)",
    )
    .bind(token.as_str())
    .bind(s.offset())
    .fetch_optional(&s.pool)
    .await?;
    let Some(row) = row else {
        return Ok(TokenLookup::NotFound);
    };
    let secret: String = row.try_get("secret")?;
    let user: Option<String> = row.try_get("username")?;
    let auth = json_column(&row, "auth", "token auth")?;
    lookup(&row, SecretToken::new(secret), user, Some(auth))
}

/// Classifies a backend row (columns `id, cluster, subdomain, last_status_number, cluster_address`).
fn lookup(
    row: &PgRow,
    secret_token: SecretToken,
    user: Option<String>,
    user_data: Option<serde_json::Map<String, serde_json::Value>>,
) -> StoreResult<TokenLookup> {
    let id: String = row.try_get("id")?;
    let backend_id: BackendId = parse("backend id", &id)?;
    let number: i32 = row.try_get("last_status_number")?;
    let ready = BackendStatus::Ready.number();
    if number < ready {
        return Ok(TokenLookup::Pending {
            backend: backend_id,
        });
    }
    if number > ready {
        return Ok(TokenLookup::NotFound);
    }
    let address: Option<String> = row.try_get("cluster_address")?;
    let address: SocketAddr = match address {
        Some(a) => parse("backend address", &a)?,
        None => {
            return Err(StoreError::Corrupt(format!(
                "ready backend {backend_id} has no address"
            )))
        }
    };
    let cluster: String = row.try_get("cluster")?;
    Ok(TokenLookup::Ready(RouteInfo {
        backend_id,
        address,
        secret_token,
        cluster: parse("cluster name", &cluster)?,
        user,
        user_data,
        subdomain: row.try_get("subdomain")?,
    }))
}
