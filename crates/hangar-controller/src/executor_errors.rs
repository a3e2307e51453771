//! Drones' executor errors (`DroneToController::ExecutorStatus`): why a drone attached to this
//! controller cannot run backends right now (its executor socket has been unreachable too long).
//! Kept in memory only, like the metrics samples: a drone re-sends its error on every connection, and
//! `GET /ctrl/c/{cluster}/state` shows it beside the drone. With several controllers, only the one the
//! drone is attached to knows it.

use hangar_store::SessionId;
use hangar_types::api::ClusterState;
use hangar_types::{ClusterName, DroneName};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

type Entries = HashMap<(ClusterName, DroneName), (SessionId, String)>;

/// Cheap to clone; shared by the drone sessions and the cluster-state handler.
#[derive(Clone, Default)]
pub struct ExecutorErrors {
    inner: Arc<Mutex<Entries>>,
}

impl ExecutorErrors {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The map holds plain data: a panic elsewhere cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what the drone's session `session` reported (`None`: all is well again).
    pub fn report(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
        session: SessionId,
        error: Option<String>,
    ) {
        let key = (cluster.clone(), drone.clone());
        match error {
            Some(error) => {
                self.lock().insert(key, (session, error));
            }
            None => {
                self.lock().remove(&key);
            }
        }
    }

    /// Forgets the error reported by `session` when it ends (a newer session's report is kept).
    pub fn session_ended(&self, cluster: &ClusterName, drone: &DroneName, session: SessionId) {
        let key = (cluster.clone(), drone.clone());
        let mut entries = self.lock();
        if entries.get(&key).is_some_and(|(s, _)| *s == session) {
            entries.remove(&key);
        }
    }

    /// Fills `executor_error` of the drones of `cluster` in `state`.
    pub fn annotate(&self, cluster: &ClusterName, state: &mut ClusterState) {
        let entries = self.lock();
        for drone in &mut state.drones {
            let hangar_types::NodeName::Drone(name) = &drone.node.name else {
                continue;
            };
            if let Some((_, error)) = entries.get(&(cluster.clone(), name.clone())) {
                drone.executor_error = Some(error.clone());
            }
        }
    }
}
