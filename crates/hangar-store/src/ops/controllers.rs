//! Where each controller can be reached by the others (`controller.internal_url`), and which
//! controller holds a drone's session: what a controller needs to forward a request (a backend's
//! logs) that only the drone's controller can answer.

use super::rows::parse;
use super::S;
use crate::model::DroneController;
use crate::StoreResult;
use hangar_types::{ClusterName, ControllerName, DroneName};
use sqlx::Row;

pub(super) async fn set_controller_url(
    s: &S,
    controller: &ControllerName,
    url: &str,
) -> StoreResult<()> {
    sqlx::query(sql!(
        "INSERT INTO controller (name, first_seen, last_heartbeat, is_online, internal_url) \
         VALUES ($2, {now}, {now}, TRUE, $3) \
         ON CONFLICT (name) DO UPDATE SET internal_url = excluded.internal_url"
    ))
    .bind(s.clock())
    .bind(controller.as_str())
    .bind(url)
    .execute(&s.writer)
    .await?;
    Ok(())
}

pub(super) async fn drone_controller(
    s: &S,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<DroneController>> {
    let row = sqlx::query(
        "SELECT n.controller, c.internal_url FROM node n \
         LEFT JOIN controller c ON c.name = n.controller \
         WHERE n.kind = 'drone' AND n.cluster = $1 AND n.name = $2 AND n.controller IS NOT NULL",
    )
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&s.reader)
    .await?;
    row.map(|row| {
        let controller: String = row.try_get("controller")?;
        Ok(DroneController {
            controller: parse("controller name", &controller)?,
            internal_url: row.try_get("internal_url")?,
        })
    })
    .transpose()
}
