//! Connection tokens: dynamic tokens (one row each, expiring) and static tokens (on the backend row),
//! and their resolution to routes.

use super::rows::{json, parse, parsed, Row};
use super::D;
use super::{commit, S};
use crate::dialect::{millis_of, render};
use crate::events::StoreEvent;
use crate::group_commit::Pending;
use crate::model::{NewToken, TokenLookup};
use crate::{StoreError, StoreResult};
use hangar_types::protocol::RouteInfo;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, BackendStatus};
use sqlx::types::Json;
use sqlx::Row as _;
use std::net::SocketAddr;

/// Group-committed ([`crate::group_commit`]): the tokens of concurrent connects are inserted by one
/// statement. Returns once this token is committed.
pub(super) async fn insert_token(s: &S, token: NewToken) -> StoreResult<()> {
    s.tokens
        .write(token, |batch| insert_token_batch(s, batch))
        .await
}

/// Inserts `batch` with one statement; if that fails, each token alone, so that a bad token (its
/// backend deleted meanwhile) fails only its own caller.
async fn insert_token_batch(s: &S, batch: Vec<Pending<NewToken>>) {
    if batch.len() > 1 {
        let tokens: Vec<&NewToken> = batch.iter().map(|(t, _)| t).collect();
        if insert_tokens(s, &tokens).await.is_ok() {
            for (_, done) in batch {
                let _ = done.send(Ok(()));
            }
            return;
        }
    }
    for (token, done) in batch {
        let _ = done.send(insert_tokens(s, &[&token]).await);
    }
}

async fn insert_tokens(s: &S, tokens: &[&NewToken]) -> StoreResult<()> {
    let mut template = String::from(
        "INSERT INTO token (token, backend_id, secret, username, auth, expires_at) VALUES ",
    );
    for i in 0..tokens.len() {
        let p = 2 + 6 * i;
        if i > 0 {
            template.push_str(", ");
        }
        template.push_str(&format!(
            "(${p}, ${}, ${}, ${}, ${}, {{now}} + ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5
        ));
    }
    let sql = render::<D>(&template);
    let mut query = sqlx::query(&sql).bind(s.clock());
    for token in tokens {
        query = query
            .bind(token.token.as_str())
            .bind(token.backend.as_str())
            .bind(token.secret.as_str())
            .bind(&token.user)
            .bind(Json(&token.auth))
            .bind(millis_of(token.lifetime));
    }
    query.execute(&s.writer).await?;
    Ok(())
}

pub(super) async fn revoke_tokens(
    s: &S,
    backend: &BackendId,
    user: &str,
) -> StoreResult<Vec<ConnectionToken>> {
    let mut tx = s.writer.begin().await?;
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
    let event = StoreEvent::TokensRevoked {
        tokens: tokens.clone(),
    };
    commit(s, tx, vec![event.into()]).await?;
    Ok(tokens)
}

/// Resolves a token to its backend's route. A ready backend whose key lease has run out on the store
/// clock has no route (its drone may be frozen while its process runs, and the key may go to another
/// backend at any moment); a route carries the time its backend's lease still runs (`lease_left`), so
/// that a proxy cut off from the controllers stops using it before the key can change hands.
pub(super) async fn resolve_token(s: &S, token: &ConnectionToken) -> StoreResult<TokenLookup> {
    if token.is_static() {
        let row = sqlx::query(sql!(
            "SELECT b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address, \
             k.expires_at - {now} AS lease_left \
             FROM backend b LEFT JOIN backend_key k ON k.backend_id = b.id \
             WHERE b.static_token = $2"
        ))
        .bind(s.clock())
        .bind(token.as_str())
        .fetch_optional(&s.reader)
        .await?;
        return match row {
            None => Ok(TokenLookup::NotFound),
            Some(row) => lookup(&row, SecretToken::empty(), None, None),
        };
    }

    // Expired tokens are refused here even before cleanup deletes them.
    let row = sqlx::query(sql!(
        "SELECT t.secret, t.username, t.auth, \
         b.id, b.cluster, b.subdomain, b.last_status_number, b.cluster_address, \
         k.expires_at - {now} AS lease_left \
         FROM token t JOIN backend b ON b.id = t.backend_id \
         LEFT JOIN backend_key k ON k.backend_id = b.id \
         WHERE t.token = $2 AND t.expires_at > {now}"
    ))
    .bind(s.clock())
    .bind(token.as_str())
    .fetch_optional(&s.reader)
    .await?;
    let Some(row) = row else {
        return Ok(TokenLookup::NotFound);
    };
    let secret: String = row.try_get("secret")?;
    let user: Option<String> = row.try_get("username")?;
    let auth = json(&row, "auth", "token auth")?;
    lookup(&row, SecretToken::new(secret), user, Some(auth))
}

/// Classifies a backend row (columns `id, cluster, subdomain, last_status_number, cluster_address,
/// lease_left`; `lease_left` is null for a backend without a key).
fn lookup(
    row: &Row,
    secret_token: SecretToken,
    user: Option<String>,
    user_data: Option<serde_json::Map<String, serde_json::Value>>,
) -> StoreResult<TokenLookup> {
    let backend_id: BackendId = parsed(row, "id", "backend id")?;
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
    let lease_left: Option<i64> = row.try_get("lease_left")?;
    let lease_remaining_ms = match lease_left {
        None => None,
        Some(left) => match u64::try_from(left) {
            Ok(left) if left > 0 => Some(left),
            _ => return Ok(TokenLookup::NotFound),
        },
    };
    let address: Option<String> = row.try_get("cluster_address")?;
    let address: SocketAddr = match address {
        Some(a) => parse("backend address", &a)?,
        None => {
            return Err(StoreError::Corrupt(format!(
                "ready backend {backend_id} has no address"
            )))
        }
    };
    Ok(TokenLookup::Ready(RouteInfo {
        backend_id,
        address,
        secret_token,
        cluster: parsed(row, "cluster", "cluster name")?,
        user,
        user_data,
        subdomain: row.try_get("subdomain")?,
        lease_remaining_ms,
    }))
}
