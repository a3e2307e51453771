//! Connection tokens: dynamic tokens (one row each, expiring) and static tokens (on the backend row),
//! and their resolution to routes.

use super::chain::Chain;
use super::rows::{backend_row, json, parse, parsed, Row, BACKEND_COLUMNS};
use super::{commit, placeholders, Db, D, S};
use crate::dialect::{millis_of, render, Dialect};
use crate::events::StoreEvent;
use crate::group_commit::{all_or_each, Answers};
use crate::model::{KeyLookup, KeyReuse, NewToken, Reuse, TokenLookup};
use crate::{StoreError, StoreResult};
use hangar_types::protocol::{RouteInfo, TokenHolder};
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, BackendStatus};
use sqlx::types::Json;
use sqlx::Row as _;
use std::net::SocketAddr;

/// Group-committed ([`crate::group_commit`]): the tokens of concurrent connects are inserted by one
/// statement. Returns once this token is committed.
pub(super) async fn insert_token(s: &S, token: NewToken) -> StoreResult<()> {
    s.tokens
        .write(token, |batch| all_or_each(s, batch, insert_token_batch))
        .await
}

fn insert_token_batch<'a>(s: &'a S, tokens: Vec<&'a NewToken>) -> Answers<'a, ()> {
    Box::pin(async move {
        let mut conn = s.flush_connection(&s.token_flush).await?;
        let inserted = insert_tokens(&mut *conn, s.clock(), &tokens).await;
        conn.settle(inserted)?;
        let answers: Vec<StoreResult<()>> = tokens.iter().map(|_| Ok(())).collect();
        Ok::<_, StoreError>(answers)
    })
}

/// Inserts `tokens` with one statement.
pub(super) async fn insert_tokens<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
    clock: i64,
    tokens: &[&NewToken],
) -> StoreResult<()> {
    let mut chain = Chain::with_clock(clock)?;
    push_tokens(&mut chain, tokens)?;
    chain.run(conn).await?;
    Ok(())
}

/// Adds to `chain` (made [`Chain::with_clock`]: the tokens expire from `{now}`) the insert of
/// `tokens`, as one write.
pub(super) fn push_tokens<'q>(chain: &mut Chain<'q>, tokens: &[&'q NewToken]) -> StoreResult<()> {
    let mut rows = Vec::with_capacity(tokens.len());
    for token in tokens {
        let value = chain.bind(token.token.as_str())?;
        let backend = chain.bind(token.backend.as_str())?;
        let secret = chain.bind(token.secret.as_str())?;
        let user = chain.bind(token.user.as_deref())?;
        let auth = chain.bind(Json(&token.auth))?;
        let lifetime = chain.bind(millis_of(token.lifetime))?;
        rows.push(format!(
            "(${value}, ${backend}, ${secret}, ${user}, ${auth}, {{now}} + ${lifetime})"
        ));
    }
    chain.push(&format!(
        "INSERT INTO token (token, backend_id, secret, username, auth, expires_at) VALUES {}",
        rows.join(", ")
    ));
    Ok(())
}

/// Group-committed like [`insert_token`]: the reuses of concurrent connects are looked up, and their
/// tokens inserted, together ([`reuse_keys`]).
pub(super) async fn reuse_key(s: &S, reuse: KeyReuse) -> StoreResult<Reuse> {
    s.reuses
        .write(reuse, |batch| all_or_each(s, batch, reuse_batch))
        .await
}

fn reuse_batch<'a>(s: &'a S, reuses: Vec<&'a KeyReuse>) -> Answers<'a, Reuse> {
    Box::pin(reuse_keys(s, reuses))
}

/// Looks up the keys of `reuses` and inserts the tokens of those that reuse their key's holder, all or
/// nothing; answers each in order. One round trip to the database: PostgreSQL runs one statement (the
/// insert is a data-modifying `WITH`); SQLite, which has none, runs the lookup and then the insert as
/// two statements of one command on the single writer connection, so no other write comes between
/// them, and a failing insert (one statement) writes nothing.
async fn reuse_keys(s: &S, reuses: Vec<&KeyReuse>) -> StoreResult<Vec<StoreResult<Reuse>>> {
    let found = found_cte(reuses.len());
    let issue = "INSERT INTO token (token, backend_id, secret, username, auth, expires_at) \
                 SELECT r.token, f.id, r.secret, r.username, r.auth, {now} + r.lifetime \
                 FROM found f JOIN r ON r.i = f.i WHERE f.reused AND f.static_token IS NULL";
    let sql = render::<D>(&if D::SPELLING.modifying_ctes {
        format!("{found}, issued AS ({issue}) SELECT * FROM found")
    } else {
        format!("{found} SELECT * FROM found; {found} {issue}")
    });
    let mut conn = s.flush_connection(&s.reuse_flush).await?;
    let rows = bind_reuses(sqlx::query(&sql), s.clock(), &reuses)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::from);
    let rows = conn.settle(rows)?;
    let mut answers: Vec<StoreResult<Reuse>> = (0..reuses.len())
        .map(|_| Ok(Reuse::NotReused(KeyLookup::Missing)))
        .collect();
    for row in &rows {
        answers[index(row, reuses.len())?] = reuse_answer(row);
    }
    Ok(answers)
}

/// `WITH r, found`: `r` holds the `n` reuses (bound by [`bind_reuses`]), `found` their keys: per key
/// that exists, `i` (the reuse's index), `held_tag`, `expired`, `reused` and [`BACKEND_COLUMNS`].
fn found_cte(n: usize) -> String {
    let values: Vec<String> = (0..n)
        .map(|i| format!("({i}, {})", placeholders(2 + 8 * i, 8)))
        .collect();
    let values = values.join(", ");
    // 60 = terminating: a backend shutting down is not reused.
    format!(
        "WITH r (i, namespace, name, tag, token, secret, username, auth, lifetime) AS \
         (VALUES {values}), \
         found AS (SELECT r.i, k.tag AS held_tag, k.expires_at <= {{now}} AS expired, \
         (k.expires_at > {{now}} AND k.tag = r.tag AND b.last_status_number < 60) AS reused, \
         {BACKEND_COLUMNS} \
         FROM r JOIN backend_key k ON k.namespace = r.namespace AND k.name = r.name \
         JOIN backend b ON b.id = k.backend_id JOIN node n ON n.id = b.drone_id)"
    )
}

fn bind_reuses<'q>(
    mut query: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>,
    clock: i64,
    reuses: &[&'q KeyReuse],
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>> {
    query = query.bind(clock);
    for &reuse in reuses {
        let grant = &reuse.grant;
        query = query
            .bind(reuse.key.namespace.as_str())
            .bind(reuse.key.name.as_str())
            .bind(reuse.tag.as_str())
            .bind(grant.token.as_str())
            .bind(grant.secret.as_str())
            .bind(&grant.user)
            .bind(Json(&grant.auth))
            .bind(millis_of(grant.lifetime));
    }
    query
}

/// The reuse index `i` of a `found` row.
fn index(row: &Row, n: usize) -> StoreResult<usize> {
    let i: i32 = row.try_get("i")?;
    usize::try_from(i)
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(|| StoreError::Corrupt(format!("reuse index {i} out of 0..{n}")))
}

/// The answer for a `found` row.
fn reuse_answer(row: &Row) -> StoreResult<Reuse> {
    let backend = backend_row(row)?;
    if row.try_get("reused")? {
        return Ok(Reuse::Reused { backend });
    }
    Ok(Reuse::NotReused(if row.try_get("expired")? {
        KeyLookup::Expired { backend }
    } else {
        KeyLookup::Live {
            tag: row.try_get("held_tag")?,
            backend,
        }
    }))
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
    // Announced even when no row was deleted: a token committed without waiting for the WAL flush
    // and forgotten in a crash may still be cached by a proxy (see `src/flush_connection.rs`).
    let event = StoreEvent::TokensRevoked {
        tokens: tokens.clone(),
        holder: Some(TokenHolder {
            backend: backend.clone(),
            user: user.to_string(),
        }),
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
