//! Decoding stored rows into typed values, and classifying constraint violations. Anything that does not
//! parse is reported as [`StoreError::Corrupt`], never a panic.

use crate::model::BackendRow;
use crate::{StoreError, StoreResult};
use hangar_types::api::KeyConfig;
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendState, Millis};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::fmt::Display;
use std::str::FromStr;

/// Columns read by [`backend_row`]; use with `FROM backend b JOIN node n ON n.id = b.drone_id`.
pub(super) const BACKEND_COLUMNS: &str = "b.id, b.cluster, b.drone_id, n.name AS drone_name, \
    b.state, b.last_status_time, b.key_namespace, b.key_name, b.key_tag, b.fencing_token, \
    b.static_token, b.subdomain, b.created_at, b.max_idle_seconds, b.lifetime_limit_seconds";

/// Primary key of `backend` (see the migration).
pub(super) const BACKEND_ID_UNIQUE: &str = "backend_id_unique";
/// Unique `(namespace, name)` of `backend_key`: one holder per key.
pub(super) const KEY_SINGLE_HOLDER: &str = "backend_key_single_holder";

pub(super) fn parse<T>(what: &str, s: &str) -> StoreResult<T>
where
    T: FromStr,
    T::Err: Display,
{
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("{what} {s:?}: {e}")))
}

pub(super) fn from_json<T: DeserializeOwned>(what: &str, v: Value) -> StoreResult<T> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn to_json<T: Serialize>(what: &str, v: &T) -> StoreResult<Value> {
    serde_json::to_value(v).map_err(|e| StoreError::Corrupt(format!("cannot encode {what}: {e}")))
}

/// Reads a JSONB column and decodes it.
pub(super) fn json_column<T: DeserializeOwned>(
    row: &PgRow,
    column: &str,
    what: &str,
) -> StoreResult<T> {
    from_json(what, row.try_get::<Value, _>(column)?)
}

pub(super) fn backend_row(row: &PgRow) -> StoreResult<BackendRow> {
    let id: String = row.try_get("id")?;
    let cluster: String = row.try_get("cluster")?;
    let drone: String = row.try_get("drone_name")?;
    let key_name: String = row.try_get("key_name")?;
    let static_token: Option<String> = row.try_get("static_token")?;
    Ok(BackendRow {
        id: parse("backend id", &id)?,
        cluster: parse("cluster name", &cluster)?,
        drone_id: row.try_get("drone_id")?,
        drone: parse("drone name", &drone)?,
        state: json_column::<BackendState>(row, "state", "backend state")?,
        state_time: Millis(row.try_get("last_status_time")?),
        key: KeyConfig {
            name: parse("key name", &key_name)?,
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

/// The constraint named `constraint` refused the statement (SQLSTATE 23505, unique violation).
pub(super) fn violates_unique(e: &sqlx::Error, constraint: &str) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation() && d.constraint().is_some_and(|c| c == constraint))
}
