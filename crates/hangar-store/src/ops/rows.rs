//! Decoding stored rows into typed values. Anything that does not parse is reported as
//! [`StoreError::Corrupt`], never a panic. JSON columns (`TEXT` in SQLite, `JSONB` in PostgreSQL) go
//! through sqlx's [`Json`], which reads and writes either.

use super::Db;
use crate::model::{BackendRow, LiveBackend};
use crate::{StoreError, StoreResult};
use hangar_types::api::KeyConfig;
use hangar_types::token::ConnectionToken;
use hangar_types::Millis;
use serde::de::DeserializeOwned;
use sqlx::types::Json;
use sqlx::Row as _;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

pub(crate) type Row = <Db as sqlx::Database>::Row;

/// Columns read by [`backend_row`]; use with `FROM backend b JOIN node n ON n.id = b.drone_id`.
pub(super) const BACKEND_COLUMNS: &str = "b.id, b.cluster, b.drone_id, n.name AS drone_name, \
    b.state, b.last_status_time, b.key_namespace, b.key_name, b.key_tag, b.fencing_token, \
    b.static_token, b.subdomain, b.created_at, b.max_idle_seconds, b.lifetime_limit_seconds";

pub(crate) fn parse<T>(what: &str, s: &str) -> StoreResult<T>
where
    T: FromStr,
    T::Err: Display,
{
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("{what} {s:?}: {e}")))
}

/// A text column parsed into `T`.
pub(crate) fn parsed<T>(row: &Row, column: &str, what: &str) -> StoreResult<T>
where
    T: FromStr,
    T::Err: Display,
{
    parse(what, &row.try_get::<String, _>(column)?)
}

/// A nullable text column parsed into `T`.
pub(crate) fn parsed_opt<T>(row: &Row, column: &str, what: &str) -> StoreResult<Option<T>>
where
    T: FromStr,
    T::Err: Display,
{
    let text: Option<String> = row.try_get(column)?;
    text.map(|s| parse(what, &s)).transpose()
}

/// A JSON column decoded into `T`.
pub(crate) fn json<T: DeserializeOwned>(row: &Row, column: &str, what: &str) -> StoreResult<T> {
    match row.try_get::<Json<T>, _>(column) {
        Ok(Json(v)) => Ok(v),
        Err(sqlx::Error::ColumnDecode { source, .. }) => {
            Err(StoreError::Corrupt(format!("{what}: {source}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// A count column (never negative) as a `u64`.
pub(super) fn count(row: &Row, column: &str) -> StoreResult<u64> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

/// A nullable column of milliseconds (an age on the store clock) as a `Duration`; a negative age is 0.
pub(super) fn age(row: &Row, column: &str) -> StoreResult<Option<Duration>> {
    let ms: Option<i64> = row.try_get(column)?;
    Ok(ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
}

pub(crate) fn backend_row(row: &Row) -> StoreResult<BackendRow> {
    let static_token: Option<String> = row.try_get("static_token")?;
    Ok(BackendRow {
        id: parsed(row, "id", "backend id")?,
        cluster: parsed(row, "cluster", "cluster name")?,
        drone_id: row.try_get("drone_id")?,
        drone: parsed(row, "drone_name", "drone name")?,
        state: json(row, "state", "backend state")?,
        state_time: Millis(row.try_get("last_status_time")?),
        key: KeyConfig {
            name: parsed(row, "key_name", "key name")?,
            namespace: row.try_get("key_namespace")?,
            tag: row.try_get("key_tag")?,
        },
        fencing_token: row.try_get("fencing_token")?,
        static_token: static_token
            .as_deref()
            .map(ConnectionToken::from_path_segment),
        subdomain: row.try_get("subdomain")?,
        created_at: Millis(row.try_get("created_at")?),
        max_idle_seconds: row.try_get("max_idle_seconds")?,
        lifetime_limit_seconds: row.try_get("lifetime_limit_seconds")?,
    })
}

/// Columns `id, drone_name, state`.
pub(super) fn live_backend(row: &Row) -> StoreResult<LiveBackend> {
    Ok(LiveBackend {
        id: parsed(row, "id", "backend id")?,
        drone: parsed(row, "drone_name", "drone name")?,
        state: json(row, "state", "backend state")?,
    })
}

/// Whether an insert happened: `false` if it violated `constraint`, an error for any other failure.
pub(super) fn inserted<T>(
    result: Result<T, sqlx::Error>,
    constraint: crate::dialect::Unique,
) -> StoreResult<bool> {
    use crate::dialect::Dialect;
    match result {
        Ok(_) => Ok(true),
        Err(e) if <super::D as Dialect>::violates(&e, constraint) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
