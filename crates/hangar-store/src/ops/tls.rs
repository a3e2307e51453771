//! The cluster certificate lease with its ACME DNS-01 TXT value, ACME HTTP-01 challenge answers, and the
//! cluster certificate (plane-api.md §7.9.3). Lease decisions use the store clock; concurrent lease
//! requests through several controllers serialize on the cluster's lease row (`INSERT … ON CONFLICT`
//! locks it and re-evaluates the takeover condition on the latest version), so at most one proxy wins.
//!
//! Other stores learn of challenges inline (they are small and bounded by the caller) and of
//! certificates by pointer (see `postgres/notify.rs`), so no PEM ever travels in a notification.

use super::rows::parsed;
use super::{commit, Conn, Db, S};
use crate::dialect::millis_of;
use crate::events::StoreEvent;
use crate::model::*;
use crate::StoreResult;
use hangar_types::timing::CERT_LEASE;
use hangar_types::{ClusterName, Millis};
use sqlx::Row;

pub(super) async fn acquire_cert_lease(
    s: &S,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    // The conflict update runs only for an expired lease or a renewal by the holder; a takeover
    // clears the previous holder's TXT value.
    let updated = sqlx::query(sql!(
        "INSERT INTO cert_lease (cluster, leased_by, leased_at, expires_at, txt_value) \
         VALUES ($2, $3, {now}, {now} + $4, NULL) \
         ON CONFLICT (cluster) DO UPDATE SET \
         txt_value = CASE WHEN cert_lease.leased_by = excluded.leased_by \
                     THEN cert_lease.txt_value ELSE NULL END, \
         leased_by = excluded.leased_by, leased_at = excluded.leased_at, \
         expires_at = excluded.expires_at \
         WHERE cert_lease.leased_by = excluded.leased_by OR cert_lease.expires_at <= {now}"
    ))
    .bind(s.clock())
    .bind(cluster.as_str())
    .bind(proxy)
    .bind(millis_of(CERT_LEASE))
    .execute(&s.writer)
    .await?;
    Ok(updated.rows_affected() > 0)
}

pub(super) async fn release_cert_lease(
    s: &S,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    let deleted = sqlx::query("DELETE FROM cert_lease WHERE cluster = $1 AND leased_by = $2")
        .bind(cluster.as_str())
        .bind(proxy)
        .execute(&s.writer)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

pub(super) async fn set_txt_record(
    s: &S,
    cluster: &ClusterName,
    proxy: NodeId,
    txt_value: Option<&str>,
) -> StoreResult<bool> {
    let updated =
        sqlx::query("UPDATE cert_lease SET txt_value = $1 WHERE cluster = $2 AND leased_by = $3")
            .bind(txt_value)
            .bind(cluster.as_str())
            .bind(proxy)
            .execute(&s.writer)
            .await?;
    Ok(updated.rows_affected() > 0)
}

pub(super) async fn txt_record(s: &S, cluster: &ClusterName) -> StoreResult<Option<String>> {
    let value: Option<Option<String>> =
        sqlx::query_scalar("SELECT txt_value FROM cert_lease WHERE cluster = $1")
            .bind(cluster.as_str())
            .fetch_optional(&s.reader)
            .await?;
    Ok(value.flatten())
}

/// Whether `proxy` holds the cluster's lease; the row stays locked until the transaction ends, so the
/// lease cannot change hands before the caller's write commits.
async fn holds_lease(conn: &mut Conn, cluster: &ClusterName, proxy: NodeId) -> StoreResult<bool> {
    let row = sqlx::query(sql!(
        "SELECT 1 FROM cert_lease WHERE cluster = $1 AND leased_by = $2 {lock:FOR SHARE}"
    ))
    .bind(cluster.as_str())
    .bind(proxy)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

pub(super) async fn set_http_challenge(
    s: &S,
    cluster: &ClusterName,
    proxy: NodeId,
    token: &str,
    key_authorization: Option<&str>,
) -> StoreResult<bool> {
    let mut tx = s.writer.begin().await?;
    if !holds_lease(&mut tx, cluster, proxy).await? {
        return Ok(false);
    }
    match key_authorization {
        Some(key_authorization) => {
            sqlx::query(sql!(
                "INSERT INTO acme_http_challenge (cluster, token, key_authorization, created_at) \
                 VALUES ($2, $3, $4, {now}) ON CONFLICT (cluster, token) DO UPDATE SET \
                 key_authorization = excluded.key_authorization, created_at = excluded.created_at"
            ))
            .bind(s.clock())
            .bind(cluster.as_str())
            .bind(token)
            .bind(key_authorization)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM acme_http_challenge WHERE cluster = $1 AND token = $2")
                .bind(cluster.as_str())
                .bind(token)
                .execute(&mut *tx)
                .await?;
        }
    }
    let event = StoreEvent::HttpChallenge {
        cluster: cluster.clone(),
        token: token.to_string(),
        key_authorization: key_authorization.map(str::to_string),
    };
    commit(s, tx, vec![event.into()]).await?;
    Ok(true)
}

pub(super) async fn http_challenges(
    s: &S,
    cluster: &ClusterName,
) -> StoreResult<Vec<HttpChallenge>> {
    Ok(sqlx::query_as(
        "SELECT token, key_authorization FROM acme_http_challenge WHERE cluster = $1 \
         ORDER BY created_at, token",
    )
    .bind(cluster.as_str())
    .fetch_all(&s.reader)
    .await?)
}

pub(super) async fn store_certificate(
    s: &S,
    cluster: &ClusterName,
    proxy: NodeId,
    cert_pem: &str,
    key_pem: &str,
) -> StoreResult<StoredCertificate> {
    let mut tx = s.writer.begin().await?;
    let stored_at: i64 = sqlx::query_scalar(sql!(
        "INSERT INTO cluster_certificate (cluster, cert_pem, key_pem, stored_at, stored_by) \
         VALUES ($2, $3, $4, {now}, $5) ON CONFLICT (cluster) DO UPDATE SET \
         cert_pem = excluded.cert_pem, key_pem = excluded.key_pem, \
         stored_at = excluded.stored_at, stored_by = excluded.stored_by \
         RETURNING stored_at"
    ))
    .bind(s.clock())
    .bind(cluster.as_str())
    .bind(cert_pem)
    .bind(key_pem)
    .bind(proxy)
    .fetch_one(&mut *tx)
    .await?;
    let stored = StoredCertificate {
        cluster: cluster.clone(),
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        stored_at: Millis(stored_at),
    };
    commit(s, tx, vec![StoreEvent::Certificate(stored.clone()).into()]).await?;
    Ok(stored)
}

pub(super) async fn certificate(
    s: &S,
    cluster: &ClusterName,
) -> StoreResult<Option<StoredCertificate>> {
    read_certificate(&s.reader, cluster).await
}

/// The cluster's certificate, read on `conn` (also by the PostgreSQL store's event listener).
pub(crate) async fn read_certificate<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
    cluster: &ClusterName,
) -> StoreResult<Option<StoredCertificate>> {
    let row = sqlx::query(
        "SELECT cluster, cert_pem, key_pem, stored_at FROM cluster_certificate WHERE cluster = $1",
    )
    .bind(cluster.as_str())
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(StoredCertificate {
            cluster: parsed(&row, "cluster", "cluster name")?,
            cert_pem: row.try_get("cert_pem")?,
            key_pem: row.try_get("key_pem")?,
            stored_at: Millis(row.try_get("stored_at")?),
        })
    })
    .transpose()
}
