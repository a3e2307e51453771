//! Warm pools and their unclaimed backends.
//!
//! Lock order, on PostgreSQL: the `warm_pool` row first, then backend rows. Every operation that
//! writes a pool's backends (insert, claim) first writes or locks the pool row, so two controllers
//! filling or claiming from one pool take turns, and a claim never waits on a backend row another
//! claim holds (`SKIP LOCKED`). A warm backend gets a key only inside [`claim_warm_backend`], which
//! clears its `warm_pool` in the same transaction: at most one key per warm backend, ever.

use super::backends::{insert_key, insert_spawns, next_fencing_token, read_backend};
use super::rows::{age, count, json, parsed};
use super::{commit, Conn, S};
use crate::model::*;
use crate::{StoreError, StoreResult};
use hangar_types::api::KeyConfig;
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig};
use hangar_types::{ClusterName, KeyName, WarmPoolName};
use sqlx::types::Json;
use sqlx::Row;

pub(super) async fn put_warm_pool(
    s: &S,
    name: &WarmPoolName,
    cluster: &ClusterName,
    config: &WarmPoolConfig,
) -> StoreResult<WarmPoolRow> {
    let mut tx = s.writer.begin().await?;
    // A new generation when what the backends run, or where, changes.
    sqlx::query(sql!(
        "INSERT INTO warm_pool (name, cluster, pool, size, executable, max_age_seconds, claim_path, \
         generation, claimed, created_at) VALUES ($2, $3, $4, $5, $6, $7, $8, {now}, 0, {now}) \
         ON CONFLICT (name) DO UPDATE SET size = excluded.size, \
         max_age_seconds = excluded.max_age_seconds, claim_path = excluded.claim_path, \
         generation = CASE WHEN warm_pool.cluster = excluded.cluster \
             AND warm_pool.pool = excluded.pool AND warm_pool.executable = excluded.executable \
             THEN warm_pool.generation ELSE {greatest}({now}, warm_pool.generation + 1) END, \
         cluster = excluded.cluster, pool = excluded.pool, executable = excluded.executable"
    ))
    .bind(s.clock())
    .bind(name.as_str())
    .bind(cluster.as_str())
    .bind(&config.pool)
    .bind(i32::try_from(config.size).unwrap_or(i32::MAX))
    .bind(Json(&config.executable))
    .bind(config.max_age_seconds.map(|a| i32::try_from(a).unwrap_or(i32::MAX)))
    .bind(&config.claim_path)
    .execute(&mut *tx)
    .await?;
    let pool = pools(&mut tx, s.clock(), Some(name)).await?.pop();
    tx.commit().await?;
    pool.ok_or_else(|| StoreError::Corrupt(format!("warm pool {name} vanished")))
}

pub(super) async fn warm_pools(s: &S) -> StoreResult<Vec<WarmPoolRow>> {
    let mut conn = s.reader.acquire().await?;
    pools(&mut conn, s.clock(), None).await
}

pub(super) async fn warm_pool(s: &S, name: &WarmPoolName) -> StoreResult<Option<WarmPoolRow>> {
    let mut conn = s.reader.acquire().await?;
    Ok(pools(&mut conn, s.clock(), Some(name)).await?.pop())
}

/// Pools (all, or the one named), by name, with their counts. 50 = ready, 60 = terminating,
/// 70 = terminated. A failed start: an unclaimed backend that ended without a terminate request,
/// newer than every ready one.
async fn pools(
    conn: &mut Conn,
    clock: i64,
    name: Option<&WarmPoolName>,
) -> StoreResult<Vec<WarmPoolRow>> {
    const UNCLAIMED: &str = "FROM backend b WHERE b.warm_pool = p.name \
        AND b.warm_generation = p.generation AND b.terminate_requested_at IS NULL";
    const FAILED: &str = "FROM backend b WHERE b.warm_pool = p.name \
        AND b.warm_generation = p.generation AND b.terminate_requested_at IS NULL \
        AND b.last_status_number = 70 AND b.created_at > COALESCE((SELECT MAX(r.created_at) \
        FROM backend r WHERE r.warm_pool = p.name AND r.warm_generation = p.generation \
        AND r.last_status_number = 50), 0)";
    let rows = sqlx::query(sql!(&format!(
        "SELECT p.name, p.cluster, p.pool, p.size, p.executable, p.max_age_seconds, p.claim_path, \
         p.generation, p.claimed, \
         (SELECT COUNT(*) {UNCLAIMED} AND b.last_status_number = 50) AS ready, \
         (SELECT COUNT(*) {UNCLAIMED} AND b.last_status_number < 50) AS starting, \
         (SELECT COUNT(*) {FAILED}) AS failed_starts, \
         {{now}} - (SELECT MAX(b.created_at) {FAILED}) AS last_failed_start_age \
         FROM warm_pool p WHERE CAST($2 AS TEXT) IS NULL OR p.name = $2 ORDER BY p.name"
    )))
    .bind(clock)
    .bind(name.map(|n| n.as_str()))
    .fetch_all(conn)
    .await?;
    rows.iter().map(pool_row).collect()
}

fn pool_row(row: &super::rows::Row) -> StoreResult<WarmPoolRow> {
    let max_age: Option<i32> = row.try_get("max_age_seconds")?;
    Ok(WarmPoolRow {
        api: WarmPool {
            name: parsed(row, "name", "warm pool name")?,
            cluster: parsed(row, "cluster", "cluster name")?,
            pool: row.try_get("pool")?,
            size: u32::try_from(row.try_get::<i32, _>("size")?).unwrap_or(0),
            executable: json(row, "executable", "warm pool executable")?,
            max_age_seconds: max_age.and_then(|a| u32::try_from(a).ok()),
            claim_path: row.try_get("claim_path")?,
            ready: count(row, "ready")?,
            starting: count(row, "starting")?,
            claimed: count(row, "claimed")?,
            failed_starts: count(row, "failed_starts")?,
        },
        generation: row.try_get("generation")?,
        last_failed_start_age: age(row, "last_failed_start_age")?,
    })
}

pub(super) async fn delete_warm_pool(s: &S, name: &WarmPoolName) -> StoreResult<bool> {
    let deleted = sqlx::query("DELETE FROM warm_pool WHERE name = $1")
        .bind(name.as_str())
        .execute(&s.writer)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

pub(super) async fn unclaimed_backends(s: &S) -> StoreResult<Vec<UnclaimedBackend>> {
    // 60 = terminating.
    let rows = sqlx::query(sql!(
        "SELECT b.id, b.warm_pool, b.warm_generation, d.draining, {now} - b.created_at AS age \
         FROM backend b JOIN drone d ON d.id = b.drone_id \
         WHERE b.warm_pool IS NOT NULL AND b.terminate_requested_at IS NULL \
         AND b.last_status_number < 60 ORDER BY b.created_at, b.id"
    ))
    .bind(s.clock())
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(UnclaimedBackend {
                id: parsed(row, "id", "backend id")?,
                pool: parsed(row, "warm_pool", "warm pool name")?,
                generation: row.try_get("warm_generation")?,
                drone_draining: row.try_get("draining")?,
                age: age(row, "age")?.unwrap_or_default(),
            })
        })
        .collect()
}

pub(super) async fn insert_warm_backend(s: &S, new: NewWarmBackend) -> StoreResult<WarmInsert> {
    let mut tx = s.writer.begin().await?;
    // Locks the pool row: concurrent fills of one pool take turns, so the count below stays true.
    let pool = sqlx::query(sql!(
        "SELECT generation, size, {now} AS now FROM warm_pool WHERE name = $2 {lock:FOR UPDATE}"
    ))
    .bind(s.clock())
    .bind(new.pool.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(pool) = pool else {
        return Ok(WarmInsert::PoolChanged);
    };
    if pool.try_get::<i64, _>("generation")? != new.generation {
        return Ok(WarmInsert::PoolChanged);
    }
    // 60 = terminating.
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM backend WHERE warm_pool = $1 AND warm_generation = $2 \
         AND terminate_requested_at IS NULL AND last_status_number < 60",
    )
    .bind(new.pool.as_str())
    .bind(new.generation)
    .fetch_one(&mut *tx)
    .await?;
    if live >= i64::from(pool.try_get::<i32, _>("size")?) {
        return Ok(WarmInsert::Full);
    }
    let now = hangar_types::Millis(pool.try_get("now")?);
    // Unclaimed, it holds no key: its key columns name itself until a claim sets them.
    let backend = NewBackend {
        key: KeyConfig {
            name: parsed_key_name(&new)?,
            namespace: String::new(),
            tag: String::new(),
        },
        id: new.id,
        cluster: new.cluster,
        pool: new.drone_pool,
        drone: new.drone,
        executable: new.executable,
        deadlines: new.deadlines,
        static_token: None,
        token: None,
        subdomain: None,
        max_idle_seconds: None,
        lifetime_limit_seconds: None,
    };
    let warm = Some((&new.pool, new.generation));
    let Some((mut actions, events)) = insert_spawns(&mut tx, &[(&backend, 0)], now, warm).await?
    else {
        // A collision of two random ids; the next pass tries another.
        return Ok(WarmInsert::Full);
    };
    let action = actions
        .pop()
        .ok_or_else(|| StoreError::Corrupt("a warm spawn queued no action".into()))?;
    commit(s, tx, events).await?;
    Ok(WarmInsert::Inserted { action })
}

fn parsed_key_name(new: &NewWarmBackend) -> StoreResult<KeyName> {
    new.id
        .as_str()
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("backend id as key name: {e}")))
}

pub(super) async fn claim_warm_backend(s: &S, claim: WarmClaim) -> StoreResult<WarmClaimOutcome> {
    let clock = s.clock();
    let mut tx = s.writer.begin().await?;
    // Writes (locks) the pool row first, see the module docs; counted only if the claim commits.
    let generation: Option<i64> = sqlx::query_scalar(
        "UPDATE warm_pool SET claimed = claimed + 1 WHERE name = $1 RETURNING generation",
    )
    .bind(claim.pool.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(generation) = generation else {
        return Ok(WarmClaimOutcome::Empty);
    };
    // 50 = ready. Oldest first, on an attached, heartbeating drone that is not draining.
    let id: Option<String> = sqlx::query_scalar(sql!(
        "SELECT b.id FROM backend b JOIN drone d ON d.id = b.drone_id \
         JOIN node n ON n.id = b.drone_id \
         WHERE b.warm_pool = $2 AND b.warm_generation = $3 AND b.last_status_number = 50 \
         AND b.terminate_requested_at IS NULL AND NOT d.draining AND n.controller IS NOT NULL \
         AND d.last_heartbeat > {now} - $4 AND (CAST($5 AS TEXT) IS NULL OR n.controller = $5) \
         ORDER BY b.created_at, b.id LIMIT 1 {lock:FOR UPDATE OF b SKIP LOCKED}"
    ))
    .bind(clock)
    .bind(claim.pool.as_str())
    .bind(generation)
    .bind(crate::dialect::millis_of(claim.max_heartbeat_age))
    .bind(claim.on_controller.as_ref().map(|c| c.as_str()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        tx.rollback().await?;
        return Ok(WarmClaimOutcome::Empty);
    };
    let (fencing_token, now) = next_fencing_token(&mut tx, clock, &claim.key).await?;
    let backend_id = parsed_id(&id)?;
    let expires_at = now.0.saturating_add(s.key_lease_ms());
    if !insert_key(&mut tx, &backend_id, &claim.key, expires_at, fencing_token).await? {
        tx.rollback().await?;
        return Ok(WarmClaimOutcome::KeyHeld);
    }
    let expiration_time = claim
        .lifetime_limit_seconds
        .map(|secs| now.0.saturating_add(i64::from(secs).saturating_mul(1000)));
    // The idle clock and the lifetime start at the claim.
    let updated = sqlx::query(
        "UPDATE backend SET key_namespace = $2, key_name = $3, key_tag = $4, fencing_token = $5, \
         static_token = $6, subdomain = $7, max_idle_seconds = $8, lifetime_limit_seconds = $9, \
         expiration_time = $10, last_keepalive = $11, warm_pool = NULL \
         WHERE id = $1 AND warm_pool IS NOT NULL",
    )
    .bind(&id)
    .bind(&claim.key.namespace)
    .bind(claim.key.name.as_str())
    .bind(&claim.key.tag)
    .bind(fencing_token)
    .bind(claim.static_token.as_ref().map(|t| t.as_str()))
    .bind(&claim.subdomain)
    .bind(claim.max_idle_seconds)
    .bind(claim.lifetime_limit_seconds)
    .bind(expiration_time)
    .bind(now.0)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(WarmClaimOutcome::Empty);
    }
    let backend = read_backend(&mut *tx, &id)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("claimed backend {id} vanished")))?;
    commit(s, tx, Vec::new()).await?;
    Ok(WarmClaimOutcome::Claimed { backend })
}

fn parsed_id(id: &str) -> StoreResult<hangar_types::BackendId> {
    super::rows::parse("backend id", id)
}
