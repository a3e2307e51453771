//! Connection tokens: dynamic tokens (one row each, expiring) and static tokens (on the backend row),
//! and their resolution to routes.

use super::rows::{from_json, parse, to_json};
use super::{millis_of, SqliteStore};
use crate::events::StoreEvent;
use crate::model::{NewToken, TokenLookup};
use crate::{StoreError, StoreResult};
use hangar_types::protocol::RouteInfo;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, BackendStatus};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::net::SocketAddr;

pub(super) async fn insert_token(s: &SqliteStore, token: NewToken) -> StoreResult<()> {
    let now = s.clock();
    let expires_at = now.0.saturating_add(millis_of(token.lifetime));
    sqlx::query(
        "INSERT INTO token (token, backend_id, secret, username, auth, expires_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(token.token.as_str())
    .bind(token.backend.as_str())
    .bind(token.secret.as_str())
    .bind(&token.user)
    .bind(to_json("token auth", &token.auth)?)
    .bind(expires_at)
    .execute(&s.writer)
    .await?;
    Ok(())
}

pub(super) async fn revoke_tokens(
    s: &SqliteStore,
    backend: &BackendId,
    user: &str,
) -> StoreResult<Vec<ConnectionToken>> {
    let deleted: Vec<String> = sqlx::query_scalar(
        "DELETE FROM token WHERE backend_id = ? AND username = ? RETURNING token",
    )
    .bind(backend.as_str())
    .bind(user)
    .fetch_all(&s.writer)
    .await?;
    let tokens: Vec<ConnectionToken> = deleted
        .iter()
        .map(|t| ConnectionToken::from_path_segment(t))
        .collect();
    if !tokens.is_empty() {
        s.events.publish(StoreEvent::TokensRevoked {
            tokens: tokens.clone(),
        });
    }
    Ok(tokens)
}

pub(super) async fn resolve_token(
    s: &SqliteStore,
    token: &ConnectionToken,
) -> StoreResult<TokenLookup> {
    if token.is_static() {
        let row = sqlx::query(
            "SELECT b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address \
             FROM backend b WHERE b.static_token = ?",
        )
        .bind(token.as_str())
        .fetch_optional(&s.reader)
        .await?;
        return match row {
            None => Ok(TokenLookup::NotFound),
            Some(row) => lookup(&row, SecretToken::empty(), None, None),
        };
    }

    let now = s.clock();
    // Expired tokens are refused here even before cleanup deletes them.
    let row = sqlx::query(
        "SELECT t.secret, t.username, t.auth, \
         b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address \
         FROM token t JOIN backend b ON b.id = t.backend_id \
         WHERE t.token = ? AND t.expires_at > ?",
    )
    .bind(token.as_str())
    .bind(now.0)
    .fetch_optional(&s.reader)
    .await?;
    let Some(row) = row else {
        return Ok(TokenLookup::NotFound);
    };
    let secret: String = row.try_get("secret")?;
    let user: Option<String> = row.try_get("username")?;
    let auth: String = row.try_get("auth")?;
    let auth = from_json("token auth", &auth)?;
    lookup(&row, SecretToken::new(secret), user, Some(auth))
}

/// Classifies a backend row (columns `id, cluster, subdomain, last_status_number, cluster_address`).
fn lookup(
    row: &SqliteRow,
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
