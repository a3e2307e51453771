//! The cluster certificate lease with its ACME DNS-01 TXT value, ACME HTTP-01 challenge answers, and the
//! cluster certificate (plane-api.md §7.9.3). Lease decisions use the store clock; concurrent lease
//! requests through several controllers serialize on the cluster's lease row (`INSERT … ON CONFLICT`
//! locks it and re-evaluates the takeover condition on the latest version), so at most one proxy wins.
//!
//! Other controllers learn of challenges inline (they are small and bounded by the caller) and of
//! certificates by pointer: the notification names the cluster and the listener reads the row, so no
//! PEM ever travels in a notification.

use super::notify::{self, Notice};
use super::rows::parse;
use super::{millis_of, PostgresStore};
use crate::events::StoreEvent;
use crate::model::*;
use crate::StoreResult;
use hangar_types::timing::CERT_LEASE;
use hangar_types::{ClusterName, Millis};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

pub(super) async fn acquire_cert_lease(
    s: &PostgresStore,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    // The conflict update runs only for an expired lease or a renewal by the holder; a takeover
    // clears the previous holder's TXT value.
    let updated = sqlx::query(
        "INSERT INTO cert_lease (cluster, leased_by, leased_at, expires_at, txt_value) \
         VALUES ($1, $2, hangar_now_ms($3), hangar_now_ms($3) + $4, NULL) \
         ON CONFLICT (cluster) DO UPDATE SET \
         txt_value = CASE WHEN cert_lease.leased_by = excluded.leased_by \
                     THEN cert_lease.txt_value ELSE NULL END, \
         leased_by = excluded.leased_by, leased_at = excluded.leased_at, \
         expires_at = excluded.expires_at \
         WHERE cert_lease.leased_by = excluded.leased_by \
         OR cert_lease.expires_at <= hangar_now_ms($3)",
    )
    .bind(cluster.as_str())
    .bind(proxy)
    .bind(s.offset())
    .bind(millis_of(CERT_LEASE))
    .execute(&s.pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn release_cert_lease(
    s: &PostgresStore,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    let deleted = sqlx::query("DELETE FROM cert_lease WHERE cluster = $1 AND leased_by = $2")
        .bind(cluster.as_str())
        .bind(proxy)
        .execute(&s.pool)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}

pub(super) async fn set_txt_record(
    s: &PostgresStore,
    cluster: &ClusterName,
    proxy: NodeId,
    txt_value: Option<&str>,
) -> StoreResult<bool> {
    let updated =
        sqlx::query("UPDATE cert_lease SET txt_value = $1 WHERE cluster = $2 AND leased_by = $3")
            .bind(txt_value)
            .bind(cluster.as_str())
            .bind(proxy)
            .execute(&s.pool)
            .await?
            .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn txt_record(
    s: &PostgresStore,
    cluster: &ClusterName,
) -> StoreResult<Option<String>> {
    let value: Option<Option<String>> =
        sqlx::query_scalar("SELECT txt_value FROM cert_lease WHERE cluster = $1")
            .bind(cluster.as_str())
            .fetch_optional(&s.pool)
            .await?;
    Ok(value.flatten())
}

/// Whether `proxy` holds the cluster's lease; the row stays locked until the transaction ends, so the
/// lease cannot change hands before the caller's write commits.
async fn holds_lease(
    conn: &mut PgConnection,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    Ok(
        sqlx::query("SELECT 1 FROM cert_lease WHERE cluster = $1 AND leased_by = $2 FOR SHARE")
            .bind(cluster.as_str())
            .bind(proxy)
            .fetch_optional(conn)
            .await?
            .is_some(),
    )
}

pub(super) async fn set_http_challenge(
    s: &PostgresStore,
    cluster: &ClusterName,
    proxy: NodeId,
    token: &str,
    key_authorization: Option<&str>,
) -> StoreResult<bool> {
    let mut tx = s.pool.begin().await?;
    if !holds_lease(&mut tx, cluster, proxy).await? {
        return Ok(false);
    }
    match key_authorization {
        Some(key_authorization) => {
            sqlx::query(
                "INSERT INTO acme_http_challenge (cluster, token, key_authorization, created_at) \
                 VALUES ($1, $2, $3, hangar_now_ms($4)) ON CONFLICT (cluster, token) DO UPDATE SET \
                 key_authorization = excluded.key_authorization, created_at = excluded.created_at",
            )
            .bind(cluster.as_str())
            .bind(token)
            .bind(key_authorization)
            .bind(s.offset())
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
    let notice = Notice::HttpChallenge {
        cluster: cluster.clone(),
        token: token.to_string(),
        key_authorization: key_authorization.map(str::to_string),
    };
    notify::send(&mut tx, &s.origin, vec![notice]).await?;
    tx.commit().await?;
    s.events.publish(StoreEvent::HttpChallenge {
        cluster: cluster.clone(),
        token: token.to_string(),
        key_authorization: key_authorization.map(str::to_string),
    });
    Ok(true)
}

pub(super) async fn http_challenges(
    s: &PostgresStore,
    cluster: &ClusterName,
) -> StoreResult<Vec<HttpChallenge>> {
    let rows = sqlx::query(
        "SELECT token, key_authorization FROM acme_http_challenge WHERE cluster = $1 \
         ORDER BY created_at, token",
    )
    .bind(cluster.as_str())
    .fetch_all(&s.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(HttpChallenge {
                token: row.try_get("token")?,
                key_authorization: row.try_get("key_authorization")?,
            })
        })
        .collect()
}

pub(super) async fn store_certificate(
    s: &PostgresStore,
    cluster: &ClusterName,
    proxy: NodeId,
    cert_pem: &str,
    key_pem: &str,
) -> StoreResult<StoredCertificate> {
    let mut tx = s.pool.begin().await?;
    let stored_at: i64 = sqlx::query_scalar(
        "INSERT INTO cluster_certificate (cluster, cert_pem, key_pem, stored_at, stored_by) \
         VALUES ($1, $2, $3, hangar_now_ms($4), $5) ON CONFLICT (cluster) DO UPDATE SET \
         cert_pem = excluded.cert_pem, key_pem = excluded.key_pem, \
         stored_at = excluded.stored_at, stored_by = excluded.stored_by \
         RETURNING stored_at",
    )
    .bind(cluster.as_str())
    .bind(cert_pem)
    .bind(key_pem)
    .bind(s.offset())
    .bind(proxy)
    .fetch_one(&mut *tx)
    .await?;
    let notice = Notice::Certificate {
        cluster: cluster.clone(),
    };
    notify::send(&mut tx, &s.origin, vec![notice]).await?;
    tx.commit().await?;
    let stored = StoredCertificate {
        cluster: cluster.clone(),
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        stored_at: Millis(stored_at),
    };
    s.events.publish(StoreEvent::Certificate(stored.clone()));
    Ok(stored)
}

pub(super) fn certificate_row(row: &PgRow) -> StoreResult<StoredCertificate> {
    let cluster: String = row.try_get("cluster")?;
    Ok(StoredCertificate {
        cluster: parse("cluster name", &cluster)?,
        cert_pem: row.try_get("cert_pem")?,
        key_pem: row.try_get("key_pem")?,
        stored_at: Millis(row.try_get("stored_at")?),
    })
}

/// Columns read by [`certificate_row`].
pub(super) const CERTIFICATE_COLUMNS: &str = "cluster, cert_pem, key_pem, stored_at";

pub(super) async fn certificate(
    s: &PostgresStore,
    cluster: &ClusterName,
) -> StoreResult<Option<StoredCertificate>> {
    let sql = format!("SELECT {CERTIFICATE_COLUMNS} FROM cluster_certificate WHERE cluster = $1");
    let row = sqlx::query(&sql)
        .bind(cluster.as_str())
        .fetch_optional(&s.pool)
        .await?;
    row.as_ref().map(certificate_row).transpose()
}
