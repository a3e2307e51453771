//! Which drone runs a new backend: among the schedulable drones of the cluster and pool that offer the
//! executable's executor (healthy heartbeat, attached, not draining — the store's query), sample
//! `best_of` at random and take the one with the fewest live backends ("power of N choices": close to
//! least-loaded without every concurrent connect piling onto the same drone).

use hangar_store::{DroneCandidate, DroneQuery, Store, StoreResult};
use hangar_types::executable::ExecutorKind;
use hangar_types::timing::UNHEALTHY_AFTER;
use hangar_types::ClusterName;
use rand::seq::IndexedRandom;
use rand::Rng;

/// Picks a drone for a new backend, or `None` when no drone can take it.
pub async fn pick_drone(
    store: &dyn Store,
    cluster: &ClusterName,
    pool: &str,
    executor: ExecutorKind,
    best_of: usize,
) -> StoreResult<Option<DroneCandidate>> {
    let query = DroneQuery {
        cluster: cluster.clone(),
        pool: pool.to_string(),
        executor,
        max_heartbeat_age: UNHEALTHY_AFTER,
    };
    let mut candidates = store.schedulable_drones(&query).await?;
    // Socket executors (Plane's custom executors) run Docker-style executables too.
    if executor == ExecutorKind::Docker {
        let socket = DroneQuery {
            executor: ExecutorKind::Socket,
            ..query
        };
        candidates.extend(store.schedulable_drones(&socket).await?);
        candidates.sort_by_key(|c| c.id);
        candidates.dedup_by_key(|c| c.id);
    }
    Ok(choose_best_of(&candidates, best_of, &mut rand::rng()).cloned())
}

/// Samples `best_of` distinct candidates (all of them when there are fewer) and returns the least
/// loaded of the sample.
pub fn choose_best_of<'a, R: Rng + ?Sized>(
    candidates: &'a [DroneCandidate],
    best_of: usize,
    rng: &mut R,
) -> Option<&'a DroneCandidate> {
    candidates
        .choose_multiple(rng, best_of.max(1))
        .min_by_key(|c| c.backend_count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::Millis;

    fn drone(id: i64, backend_count: i64) -> DroneCandidate {
        DroneCandidate {
            id,
            name: hangar_types::DroneName::random(),
            last_local_time: Millis(0),
            backend_count,
        }
    }

    #[test]
    fn empty_gives_none() {
        assert!(choose_best_of(&[], 2, &mut rand::rng()).is_none());
    }

    #[test]
    fn sampling_everything_picks_the_least_loaded() {
        let drones = vec![drone(1, 5), drone(2, 0), drone(3, 7)];
        for _ in 0..50 {
            let chosen = choose_best_of(&drones, 3, &mut rand::rng()).unwrap();
            assert_eq!(chosen.id, 2);
        }
        // More than there are is fine too.
        assert_eq!(choose_best_of(&drones, 10, &mut rand::rng()).unwrap().id, 2);
    }

    #[test]
    fn best_of_two_never_picks_the_most_loaded_of_two() {
        let drones = vec![drone(1, 100), drone(2, 1)];
        for _ in 0..50 {
            assert_eq!(choose_best_of(&drones, 2, &mut rand::rng()).unwrap().id, 2);
        }
    }

    #[test]
    fn best_of_one_spreads_load() {
        let drones = vec![drone(1, 100), drone(2, 1)];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(choose_best_of(&drones, 1, &mut rand::rng()).unwrap().id);
        }
        assert_eq!(seen.len(), 2);
    }
}
