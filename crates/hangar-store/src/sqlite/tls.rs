//! The cluster certificate lease with its ACME DNS-01 TXT value, ACME HTTP-01 challenge answers, and the
//! cluster certificate (plane-api.md §7.9.3). Lease decisions use the store clock.

use super::rows::parse;
use super::SqliteStore;
use crate::events::StoreEvent;
use crate::model::*;
use crate::StoreResult;
use hangar_types::timing::CERT_LEASE;
use hangar_types::{ClusterName, Millis};
use sqlx::{Row, SqliteConnection};

pub(super) async fn acquire_cert_lease(
    s: &SqliteStore,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    let now = s.clock();
    // The conflict update runs only for an expired lease or a renewal by the holder; a takeover
    // clears the previous holder's TXT value.
    let updated = sqlx::query(
        "INSERT INTO cert_lease (cluster, leased_by, leased_at, expires_at, txt_value) \
         VALUES (?, ?, ?, ?, NULL) \
         ON CONFLICT (cluster) DO UPDATE SET \
         txt_value = CASE WHEN cert_lease.leased_by = excluded.leased_by \
                     THEN cert_lease.txt_value ELSE NULL END, \
         leased_by = excluded.leased_by, leased_at = excluded.leased_at, \
         expires_at = excluded.expires_at \
         WHERE cert_lease.leased_by = excluded.leased_by OR cert_lease.expires_at <= ?",
    )
    .bind(cluster.as_str())
    .bind(proxy)
    .bind(now.0)
    .bind(now.plus(CERT_LEASE).0)
    .bind(now.0)
    .execute(&s.writer)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn release_cert_lease(
    s: &SqliteStore,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    let deleted = sqlx::query("DELETE FROM cert_lease WHERE cluster = ? AND leased_by = ?")
        .bind(cluster.as_str())
        .bind(proxy)
        .execute(&s.writer)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}

pub(super) async fn set_txt_record(
    s: &SqliteStore,
    cluster: &ClusterName,
    proxy: NodeId,
    txt_value: Option<&str>,
) -> StoreResult<bool> {
    let updated =
        sqlx::query("UPDATE cert_lease SET txt_value = ? WHERE cluster = ? AND leased_by = ?")
            .bind(txt_value)
            .bind(cluster.as_str())
            .bind(proxy)
            .execute(&s.writer)
            .await?
            .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn txt_record(
    s: &SqliteStore,
    cluster: &ClusterName,
) -> StoreResult<Option<String>> {
    let value: Option<Option<String>> =
        sqlx::query_scalar("SELECT txt_value FROM cert_lease WHERE cluster = ?")
            .bind(cluster.as_str())
            .fetch_optional(&s.reader)
            .await?;
    Ok(value.flatten())
}

async fn holds_lease(
    conn: &mut SqliteConnection,
    cluster: &ClusterName,
    proxy: NodeId,
) -> StoreResult<bool> {
    Ok(
        sqlx::query("SELECT 1 FROM cert_lease WHERE cluster = ? AND leased_by = ?")
            .bind(cluster.as_str())
            .bind(proxy)
            .fetch_optional(conn)
            .await?
            .is_some(),
    )
}

pub(super) async fn set_http_challenge(
    s: &SqliteStore,
    cluster: &ClusterName,
    proxy: NodeId,
    token: &str,
    key_authorization: Option<&str>,
) -> StoreResult<bool> {
    let now = s.clock();
    let mut tx = s.writer.begin().await?;
    if !holds_lease(&mut tx, cluster, proxy).await? {
        return Ok(false);
    }
    match key_authorization {
        Some(key_authorization) => {
            sqlx::query(
                "INSERT INTO acme_http_challenge (cluster, token, key_authorization, created_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (cluster, token) DO UPDATE SET \
                 key_authorization = excluded.key_authorization, created_at = excluded.created_at",
            )
            .bind(cluster.as_str())
            .bind(token)
            .bind(key_authorization)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM acme_http_challenge WHERE cluster = ? AND token = ?")
                .bind(cluster.as_str())
                .bind(token)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    s.events.publish(StoreEvent::HttpChallenge {
        cluster: cluster.clone(),
        token: token.to_string(),
        key_authorization: key_authorization.map(str::to_string),
    });
    Ok(true)
}

pub(super) async fn http_challenges(
    s: &SqliteStore,
    cluster: &ClusterName,
) -> StoreResult<Vec<HttpChallenge>> {
    let rows = sqlx::query(
        "SELECT token, key_authorization FROM acme_http_challenge WHERE cluster = ? \
         ORDER BY created_at, token",
    )
    .bind(cluster.as_str())
    .fetch_all(&s.reader)
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
    s: &SqliteStore,
    cluster: &ClusterName,
    proxy: NodeId,
    cert_pem: &str,
    key_pem: &str,
) -> StoreResult<StoredCertificate> {
    let now = s.clock();
    sqlx::query(
        "INSERT INTO cluster_certificate (cluster, cert_pem, key_pem, stored_at, stored_by) \
         VALUES (?, ?, ?, ?, ?) ON CONFLICT (cluster) DO UPDATE SET cert_pem = excluded.cert_pem, \
         key_pem = excluded.key_pem, stored_at = excluded.stored_at, stored_by = excluded.stored_by",
    )
    .bind(cluster.as_str())
    .bind(cert_pem)
    .bind(key_pem)
    .bind(now.0)
    .bind(proxy)
    .execute(&s.writer)
    .await?;
    let stored = StoredCertificate {
        cluster: cluster.clone(),
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        stored_at: now,
    };
    s.events.publish(StoreEvent::Certificate(stored.clone()));
    Ok(stored)
}

pub(super) async fn certificate(
    s: &SqliteStore,
    cluster: &ClusterName,
) -> StoreResult<Option<StoredCertificate>> {
    let row = sqlx::query(
        "SELECT cluster, cert_pem, key_pem, stored_at FROM cluster_certificate WHERE cluster = ?",
    )
    .bind(cluster.as_str())
    .fetch_optional(&s.reader)
    .await?;
    row.map(|row| {
        let cluster: String = row.try_get("cluster")?;
        Ok(StoredCertificate {
            cluster: parse("cluster name", &cluster)?,
            cert_pem: row.try_get("cert_pem")?,
            key_pem: row.try_get("key_pem")?,
            stored_at: Millis(row.try_get("stored_at")?),
        })
    })
    .transpose()
}
